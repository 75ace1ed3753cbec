"""Samplers for velocity-prediction models on the linear interpolant (REPA/ERW convention).

Time runs from t = 1 (noise) to t = 0 (data); ``x_t = (1 - t) x0 + t eps`` and the model predicts
the velocity ``v(x, t) = E[eps - x0 | x_t = x]``.

Score from velocity: write ``E0 = E[x0 | x_t]``, ``E1 = E[eps | x_t]``. Then ``x_t = (1 - t) E0 + t E1``
and ``v = E1 - E0``, so ``E1 = x_t + (1 - t) v`` and (Tweedie, eps ~ N(0, I))
``score(x, t) = grad log p_t(x) = -E1 / t = -(x + (1 - t) v) / t``.

SDE: the reverse-time SDE with diffusion ``g(t)^2 = w(t) = 2t`` that keeps the marginals p_t is
``dx = [v - (w/2) score] dt + sqrt(w) dW`` (dt < 0). With the score above the drift simplifies to
``v + (x + (1 - t) v) = x + (2 - t) v``, finite at every t. Euler–Maruyama runs on
``linspace(1, 0.04, steps)`` and the last step 0.04 -> 0 takes the drift only (no noise), as
REPA/ERW evaluate. ODE: the probability-flow ODE ``dx = v dt`` with Euler or Heun on
``linspace(1, 0, steps + 1)``.

Model evaluations (NFE): ``steps`` for ``ode-euler`` and ``sde``, ``2 * steps`` for ``ode-heun``;
each guided evaluation is one forward over 2B rows (conditional then unconditional half).

Every sampler is a step function with one signature,
``step(velocity, x, t_cur, t_next, last, randn) -> x``, driven over :func:`time_grid` by :func:`sample`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..utils.seeding import index_generator
from .guidance import ClassifierFreeGuidance, check_guidance, guidance_active, resolve_null_class

__all__ = ["SAMPLERS", "sample", "sample_grid", "sample_noise", "time_grid", "ode_euler_step", "ode_heun_step",
           "sde_step"]

SDE_T_END = 0.04  # last stochastic time; one deterministic step to 0 follows


# --------------------------------------------------------------------------------------------
# Time grid and noise
# --------------------------------------------------------------------------------------------
def time_grid(sampler: str, steps: int) -> torch.Tensor:
    """The float64 time points a sampler visits (from 1 down to 0)."""
    if sampler == "sde":
        return torch.cat([torch.linspace(1.0, SDE_T_END, steps, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) from one generator or a list of B generators.

    Per-sample generators live on the CPU (sample i depends only on (seed, i)); their draws are
    stacked on the host and moved to ``device`` in ONE transfer (pinned, non-blocking on CUDA), not
    one copy per sample."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        out = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return out.to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    host = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens])
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int, device="cpu",
                 dtype=torch.float32):
    """Initial noise for the given sample indices plus their per-index generators.

    Returns ``(noise (len(indices), *shape), generators)``; pass the generators to :func:`sample`
    so the SDE noise of sample i also depends only on (seed, i).
    """
    gens = [index_generator(seed, int(i)) for i in indices]
    if not gens:
        return torch.empty((0, *shape), device=device, dtype=dtype), gens
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype), gens


# --------------------------------------------------------------------------------------------
# One step of each sampler: step(velocity, x, t_cur, t_next, last, randn) -> x at t_next
# (``velocity(x, t)``; ``last``: the step to t = 0; ``randn(shape)``: the sampler's noise)
# --------------------------------------------------------------------------------------------
def ode_euler_step(velocity, x, t_cur, t_next, last, randn):
    dt = t_next - t_cur  # negative
    v = velocity(x, t_cur)
    return x + dt * v


def ode_heun_step(velocity, x, t_cur, t_next, last, randn):
    dt = t_next - t_cur
    v = velocity(x, t_cur)
    x_pred = x + dt * v
    v_next = velocity(x_pred, t_next)
    return x + dt * 0.5 * (v + v_next)


def sde_step(velocity, x, t_cur, t_next, last, randn):
    """Euler–Maruyama: drift v - t * score = x + (2 - t) v, diffusion g^2 = 2t; the last step
    (to t = 0) is deterministic."""
    dt = t_next - t_cur
    v = velocity(x, t_cur)
    drift = x + (2.0 - t_cur) * v
    x = x + dt * drift
    if not last:
        z = randn(x.shape)
        x = x + math.sqrt(2.0 * t_cur * -dt) * z
    return x


_STEPS = {"ode-euler": ode_euler_step, "ode-heun": ode_heun_step, "sde": sde_step}
SAMPLERS = tuple(_STEPS)  # ("ode-euler", "ode-heun", "sde")


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------
def _model_dtype_device(model, like: torch.Tensor):
    params = getattr(model, "parameters", None)
    if callable(params):
        try:
            p = next(iter(params()))
            return p.dtype, p.device
        except (StopIteration, TypeError):
            pass
    return like.dtype, like.device


def _check_inputs(sampler, steps, noise, labels) -> Tuple[int, torch.Tensor]:
    """Validated ``(steps, labels)``; ValueError with the reason otherwise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not torch.is_tensor(noise) or noise.dim() < 1 or not noise.is_floating_point():
        raise ValueError("noise must be a floating-point tensor of shape (B, ...)")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != noise.shape[0]:
        raise ValueError(f"labels must have shape ({noise.shape[0]},) to match noise {tuple(noise.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    return int(steps), labels


def _model_forward(model, device, m_dtype, s_dtype):
    """``forward(x, t, y)`` for a Python time ``t``: the model's velocity in the integration dtype."""
    def forward(xin: torch.Tensor, t: float, yin: torch.Tensor) -> torch.Tensor:
        tin = torch.full((xin.shape[0],), t, device=device, dtype=m_dtype)
        out = model(xin.to(m_dtype), tin, yin)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.shape != xin.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(xin.shape)}")
        return out.to(s_dtype)
    return forward


@torch.no_grad()
def sample(
    model: Callable,
    noise: torch.Tensor,
    labels: torch.Tensor,
    sampler: str = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    null_class: Optional[int] = None,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (t = 1) to samples (t = 0) with a velocity model.

    ``model(x, t, y)`` returns the velocity or ``(velocity, zs)``. Guidance ``cfg_scale != 1`` is
    applied at times t with ``lo <= t <= hi`` for ``guidance_interval = (lo, hi)``: one forward
    over ``[x, x]`` with labels ``[y, null_class]`` and ``v = v_u + s (v_c - v_u)``
    (:mod:`erw_fast.sampling.guidance`). ``generator`` (one, or one per sample) drives the SDE
    noise. ``progress`` (optional) wraps the step range.
    Returns a tensor like ``noise`` (same dtype) on the model's device.
    """
    steps, labels = _check_inputs(sampler, steps, noise, labels)
    cfg_scale, lo, hi = check_guidance(cfg_scale, guidance_interval)
    null_id = resolve_null_class(model, null_class) if cfg_scale != 1.0 else None

    m_dtype, device = _model_dtype_device(model, noise)
    # integrate in at least float32 (float64 if the noise is float64), feed the model its dtype
    s_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    x = noise.to(device=device, dtype=s_dtype)
    y = labels.to(device=device, dtype=torch.long)
    cfg = ClassifierFreeGuidance(_model_forward(model, device, m_dtype, s_dtype), null_id)

    def velocity(x_cur: torch.Tensor, t: float) -> torch.Tensor:
        return cfg(x_cur, t, y, cfg_scale, guidance_active(cfg_scale, t, lo, hi))

    def randn(shape) -> torch.Tensor:
        return _randn(shape, generator, device, s_dtype)

    step = _STEPS[sampler]
    ts = time_grid(sampler, steps).tolist()
    rng = range(len(ts) - 1)
    if progress is not None:
        rng = progress(rng)
    for i in rng:
        x = step(velocity, x, ts[i], ts[i + 1], i == len(ts) - 2, randn)
    return x.to(noise.dtype)


def sample_grid(
    model: Callable,
    num_classes: int,
    per_class: int,
    shape: Sequence[int],
    sampler: str = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    null_class: Optional[int] = None,
    seed: int = 0,
    device=None,
    dtype=torch.float32,
    classes: Optional[Sequence[int]] = None,
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """Samples for a class grid: ``(len(classes) * per_class, *shape)``, class-major.

    Image ``k * per_class + j`` is the j-th sample of the k-th class, so
    ``save_png_grid(images, path, nrow=per_class)`` draws one row per class. Noise is seeded per
    index (:func:`sample_noise`), so a grid does not depend on anything but ``seed``.
    """
    if per_class < 1 or num_classes < 1:
        raise ValueError(f"need num_classes >= 1 and per_class >= 1, got {num_classes}, {per_class}")
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if device is None:
        _, device = _model_dtype_device(model, torch.empty(0))
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    noise, gens = sample_noise(range(len(labels)), shape, seed, device=device, dtype=dtype)
    return sample(model, noise, labels.to(device), sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                  guidance_interval=guidance_interval, null_class=null_class, generator=gens, progress=progress)

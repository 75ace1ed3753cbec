"""Classifier-free guidance with a guidance interval: the one implementation.

Guidance with scale ``s != 1`` is applied at times t with ``lo <= t <= hi``: the model runs once
over ``[x, x]`` with labels ``[y, null]`` (conditional half first) and the velocity is
``v_u + s (v_c - v_u)``; elsewhere it runs over ``x`` alone and the conditional velocity is used.

:class:`ClassifierFreeGuidance` wraps a velocity function ``forward(x, t, y)``; the Python
samplers (:mod:`erw_fast.sampling.samplers`) and the exported module
(:class:`erw_fast.sampling.export.GuidedVelocity`, which branches with ``torch.cond``) both use it,
and :func:`guidance_active` decides the branch for Python numbers and for tensors alike.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["ClassifierFreeGuidance", "guidance_active", "check_guidance", "resolve_null_class"]


def guidance_active(cfg_scale, t, lo, hi):
    """Whether guidance applies at time ``t``: ``cfg_scale != 1`` and ``lo <= t <= hi``.

    Python numbers give a ``bool``; float64 tensors (the exported module) give a bool tensor.
    """
    return (cfg_scale != 1.0) & (lo <= t) & (t <= hi)


def check_guidance(cfg_scale, guidance_interval: Sequence[float]) -> Tuple[float, float, float]:
    """``(scale, lo, hi)`` as floats; ValueError for a non-finite scale or ``lo > hi``."""
    cfg_scale = float(cfg_scale)
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    lo, hi = (float(v) for v in guidance_interval)
    if lo > hi:
        raise ValueError(f"guidance_interval {guidance_interval} must be (low, high) with low <= high")
    return cfg_scale, lo, hi


def resolve_null_class(model, null_class: Optional[int] = None) -> int:
    """The null (unconditional) class id: ``null_class``, else the model's ``num_classes``."""
    if null_class is not None:
        return int(null_class)
    for obj in (model, getattr(model, "module", None)):
        n = getattr(obj, "num_classes", None) if obj is not None else None
        if n is not None:
            return int(n)
    raise ValueError(
        "classifier-free guidance (cfg_scale != 1) needs the null class id: pass null_class= "
        "or give the model a num_classes attribute (null class id = num_classes)"
    )


class ClassifierFreeGuidance:
    """Guided velocity of ``forward(x, t, y) -> v`` (``t`` in whatever form ``forward`` takes).

    ``guided`` is one forward over 2B rows and the guidance combination; ``conditional`` is the
    plain forward; calling the wrapper picks one of them from ``active``.
    """

    def __init__(self, forward: Callable, null_class: Optional[int]):
        self.forward = forward
        self.null_class = null_class

    def conditional(self, x, t, y):
        return self.forward(x, t, y)

    def guided(self, x, t, y, scale):
        xin = torch.cat([x, x])
        yin = torch.cat([y, torch.full_like(y, self.null_class)])
        out = self.forward(xin, t, yin)
        b = x.shape[0]
        cond, uncond = out[:b], out[b:]
        return uncond + scale * (cond - uncond)

    def __call__(self, x, t, y, scale, active: bool):
        return self.guided(x, t, y, scale) if active else self.conditional(x, t, y)

"""Export a trained SiT as an AOTInductor package for the C++ sampler (``csrc/``, ``erw_sample``).

The library behind ``python -m erw_fast.export``; the checkpoint may also be a run folder (e.g.
``runs/erw-digits``): its latest checkpoint is used (:func:`erw_fast.models.checkpoint.resolve_checkpoint`).

What goes into the package is one function, the *guided velocity*::

    v = guided_velocity(x, t, y, cfg_scale, t_lo, t_hi)
        x          float32 (B, C, H, W)   the current state
        t          float64 (1,)           the current time (1 = noise, 0 = data)
        y          int64   (B,)           class ids
        cfg_scale  float64 (1,)           guidance scale
        t_lo, t_hi float64 (1,)           guidance interval
        -> v       float32 (B, C, H, W)

It follows :func:`erw_fast.sampling.sample` exactly: when ``cfg_scale != 1`` and
``t_lo <= t <= t_hi`` (compared in float64, like the Python sampler compares its float64 time grid)
the model runs once over ``[x, x]`` with labels ``[y, null]`` and returns
``v_u + cfg_scale * (v_c - v_u)``; otherwise it runs over ``x`` alone and returns the conditional
velocity. Scale and interval are runtime inputs. The branch is a ``torch.cond`` inside the one
exported graph, so an unguided step costs one B-row forward, not 2B. The batch dimension is dynamic
(any B >= 1) unless ``--static-batch`` is given, which fixes it to ``--batch``.

The model is exported through its plain PyTorch path (``set_fused(False)``) on every device: the
fused ops in :mod:`erw_fast.ops` are ``torch.library.custom_op`` with Python implementations, which
a package that runs without Python cannot call (they are not ``torch.library.triton_op``).
Inductor fuses the LayerNorm+modulate and gated-residual pointwise work itself. Attention is
exported with the ``sdpa`` backend.

Metadata for the C++ side is embedded in the package (``aot_inductor.metadata``; read with
``AOTIModelPackageLoader::get_metadata``): ``erw.format`` (= ``erw_guided_velocity/1``),
``erw.input_size``, ``erw.in_channels``, ``erw.num_classes``, ``erw.null_class``, ``erw.batch``
(``dynamic`` or a number), ``erw.device``, ``erw.weights``, ``erw.steps`` (training steps of the
checkpoint). The same dictionary is written next to the package as ``<out>.json`` for humans and
scripts.

The package is built beside ``out`` under a temporary name and renamed onto it only when complete,
so a failed export (a compiler error, Ctrl-C, a full disk) leaves an existing ``out`` as it was.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

from ..models import checkpoint as _checkpoint
from ..models.checkpoint import WarmupCheckpointError, load_checkpoint, read_checkpoint
from ..models.sit import SiT
from .guidance import ClassifierFreeGuidance, guidance_active
from ..utils.cli import check_writable

FORMAT = "erw_guided_velocity/1"
MAX_BATCH = 1 << 16

__all__ = ["GuidedVelocity", "ExportError", "resolve_checkpoint", "load_sit_for_export", "export_package",
           "export_checkpoint", "FORMAT"]


class ExportError(RuntimeError):
    """A problem the user can fix (bad checkpoint, unsupported torch, bad option)."""


class GuidedVelocity(nn.Module):
    """The guided velocity of a SiT as one module with runtime guidance scale and interval.

    The guidance is :class:`erw_fast.sampling.guidance.ClassifierFreeGuidance`, the one the Python
    samplers use; its two branches become a ``torch.cond``.
    """

    def __init__(self, model: SiT, null_class: int):
        super().__init__()
        self.model = model
        self.null_class = int(null_class)

    def _velocity(self, x, t32, y):
        return self.model(x, t32.expand(x.shape[0]), y)[0]

    def forward(self, x, t, y, cfg_scale, t_lo, t_hi):
        # decide in float64, like erw_fast.sampling (its grid is float64, the model sees float32)
        use_cfg = guidance_active(cfg_scale, t, t_lo, t_hi)
        t32 = t.to(torch.float32)
        scale = cfg_scale.to(torch.float32)
        cfg = ClassifierFreeGuidance(self._velocity, self.null_class)
        return torch.cond(
            use_cfg.reshape(()),
            lambda x, t32, y, scale: cfg.guided(x, t32, y, scale),
            lambda x, t32, y, scale: cfg.conditional(x, t32, y),
            (x, t32, y, scale),
        )


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file (as is: a missing file is reported when it is read), or the latest
    checkpoint of a run folder (:func:`erw_fast.models.checkpoint.resolve_checkpoint`); a folder
    without one raises :class:`ExportError`."""
    if not os.path.isdir(path):
        return path
    try:
        return _checkpoint.resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e


def load_sit_for_export(ckpt_path: str, weights: str = "ema"):
    """A SiT with the checkpoint's ``weights`` (``ema`` or ``model``) and the checkpoint's steps.

    ``ckpt_path`` may be a run folder (its latest checkpoint is used). Raises :class:`ExportError`
    when the file is not a SiT checkpoint.
    """
    ckpt_path = resolve_checkpoint(ckpt_path)
    try:
        ckpt = read_checkpoint(ckpt_path)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    except ValueError as e:
        raise ExportError(f"{ckpt_path} is not a SiT checkpoint: {e}") from e
    if not isinstance(ckpt, dict):
        raise ExportError(f"{ckpt_path} is not a SiT checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    if weights not in ("ema", "model"):
        raise ExportError(f"--weights must be 'ema' or 'model', got {weights!r}")
    if weights in ckpt:
        sd = ckpt[weights]
    elif "model" in ckpt or "ema" in ckpt:
        raise ExportError(f"{ckpt_path} has no {weights!r} weights (keys: {sorted(ckpt)})")
    else:  # a bare state dict
        sd = ckpt
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise ExportError(f"{ckpt_path} is not a SiT checkpoint: no tensors under {weights!r}")
    try:  # the one loader (config inference, ERW's RoPE tables, the warmup-checkpoint check)
        model = load_checkpoint({**ckpt, weights: sd} if weights in ckpt else sd, which=weights)
    except WarmupCheckpointError as e:
        raise ExportError(str(e).replace("the checkpoint", ckpt_path)) from e
    except (ValueError, TypeError) as e:
        raise ExportError(f"{ckpt_path} is not a SiT checkpoint: {e}") from e
    steps = ckpt.get("steps")
    return model, (int(steps) if isinstance(steps, (int, float)) else None)


def _require_aoti():
    try:
        import torch._inductor as inductor
        from torch.export import Dim, export  # noqa: F401
    except Exception as e:  # pragma: no cover - very old torch
        raise ExportError(f"torch {torch.__version__} lacks torch.export / torch._inductor: {e}") from e
    if not hasattr(inductor, "aoti_compile_and_package"):
        raise ExportError(
            f"torch {torch.__version__} lacks AOTInductor packaging "
            "(torch._inductor.aoti_compile_and_package); install torch >= 2.6"
        )
    if not hasattr(torch, "cond"):
        raise ExportError(f"torch {torch.__version__} lacks torch.cond; install torch >= 2.6")
    return inductor


def _check_options(device: str, batch: int):
    if device not in ("cpu", "cuda"):
        raise ExportError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda was requested but torch sees no CUDA device")
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")


def _plain_model(model: SiT, device: str) -> SiT:
    """The model in float32 eval mode on ``device`` through its plain PyTorch path."""
    model = model.float().eval().to(device)
    model.set_fused(False)  # custom ops with Python bodies cannot run inside a package
    for m in model.modules():  # SDPA lowers cleanly; flash-attn / xformers are Python extensions
        if hasattr(m, "backend") and m.backend in ("auto", "flash", "xformers"):
            m.backend = "sdpa"
    return model


def _example_inputs(model: SiT, device: str, batch: int, dynamic_batch: bool):
    """Example inputs of :class:`GuidedVelocity` and their dynamic shapes (or None)."""
    from torch.export import Dim

    c, s = model.in_channels, model.input_size
    example_b = max(batch, 2)
    f64 = dict(dtype=torch.float64, device=device)
    inputs = (
        torch.randn(example_b if dynamic_batch else batch, c, s, s, device=device),
        torch.tensor([0.5], **f64),
        torch.zeros(example_b if dynamic_batch else batch, dtype=torch.long, device=device),
        torch.tensor([2.0], **f64),
        torch.tensor([0.0], **f64),
        torch.tensor([1.0], **f64),
    )
    shapes = None
    if dynamic_batch:
        b = Dim("batch", min=1, max=MAX_BATCH)
        shapes = ({0: b}, None, {0: b}, None, None, None)
    return inputs, shapes


def _metadata(model: SiT, null_class: int, has_null: bool, device: str, batch: int, dynamic_batch: bool,
              extra_metadata: Optional[dict]) -> dict:
    metadata = {
        "erw.format": FORMAT,
        "erw.input_size": str(model.input_size),
        "erw.in_channels": str(model.in_channels),
        "erw.num_classes": str(model.num_classes),
        "erw.null_class": str(null_class),
        "erw.has_null_class": "1" if has_null else "0",
        "erw.batch": "dynamic" if dynamic_batch else str(batch),
        "erw.device": device,
        "erw.torch_version": torch.__version__,
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    return metadata


def _partial_path(out: str) -> str:
    """A temporary name beside ``out`` (same folder, so the final rename is atomic; ends in .pt2
    as AOTInductor requires)."""
    folder, name = os.path.split(out)
    return os.path.join(folder, f".{name}.partial-{os.getpid()}.pt2")


def _inductor_configs(metadata: dict) -> dict:
    """AOTInductor's options for the package: the metadata, and buffer reuse off where the installed
    inductor's memory planner is known to crash on this graph. The guidance interval is a ``torch.cond``,
    so the graph has subgraphs, and before torch 2.13 the wrapper's buffer-reuse planner kept the outer
    graph's peak-memory estimate inside them ("End index 7 out of bounds [0, 5]", seen on torch 2.11;
    2.13 makes one estimate per subgraph). Reuse off costs the package some memory, not a number."""
    configs = {"aot_inductor.metadata": dict(metadata)}
    if _torch_below(2, 13):
        configs["allow_buffer_reuse"] = False
    return configs


def _torch_below(major: int, minor: int) -> bool:
    """Whether the installed torch release is older than ``major.minor`` (local tags like +cpu ignored)."""
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def _compile_package(inductor, ep, out: str, metadata: dict):
    """AOTInductor-compile ``ep`` into ``out`` (+ ``out.json``) through temporary files renamed at the
    end; on any failure both are removed and an existing ``out`` is left untouched."""
    partial = _partial_path(out)
    try:
        inductor.aoti_compile_and_package(
            ep, package_path=partial, inductor_configs=_inductor_configs(metadata)
        )
        with open(partial + ".json", "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.replace(partial, out)
        os.replace(partial + ".json", out + ".json")
    except BaseException as e:
        for path in (partial, partial + ".json"):
            if os.path.exists(path):
                os.remove(path)
        if isinstance(e, (OSError, KeyboardInterrupt)) or not isinstance(e, Exception):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:300]
        kept = f"{out} is unchanged" if os.path.exists(out) else f"nothing was written to {out}"
        raise ExportError(f"the AOTInductor compile failed ({type(e).__name__}: {first}); {kept}. A C++ compiler "
                          "(CXX, default g++) must work; rerun with --debug for the full error") from e


def export_package(model: SiT, out: str, device: str = "cpu", batch: int = 2, dynamic_batch: bool = True,
                   extra_metadata: Optional[dict] = None, verbose: bool = False) -> dict:
    """Export ``model``'s guided velocity to the AOTInductor package ``out`` (and ``out.json``), replacing
    them only when the new package is complete; returns the metadata."""
    inductor = _require_aoti()
    from torch.export import export

    _check_options(device, batch)
    check_writable(out, "--out")  # before the minutes of compiling, and not blamed on the compiler
    has_null = model.y_embedder.embedding_table.num_embeddings > model.num_classes
    null_class = model.num_classes
    model = _plain_model(model, device)
    wrapper = GuidedVelocity(model, null_class).eval()
    inputs, shapes = _example_inputs(model, device, batch, dynamic_batch)
    metadata = _metadata(model, null_class, has_null, device, batch, dynamic_batch, extra_metadata)

    t0 = time.perf_counter()
    with torch.no_grad():
        ep = export(wrapper, inputs, dynamic_shapes=shapes, strict=False)
    t1 = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _compile_package(inductor, ep, out, metadata)
    t2 = time.perf_counter()
    if verbose:
        print(f"export {t1 - t0:.1f}s, AOTInductor compile {t2 - t1:.1f}s -> {out}", file=sys.stderr)
    return metadata


def export_checkpoint(ckpt: str, out: str, *, device: str = "cpu", weights: str = "ema", batch: int = 2,
                      dynamic_batch: bool = True) -> dict:
    """Export checkpoint ``ckpt`` (a file or a run folder: its latest checkpoint) to ``out``;
    returns the metadata. Raises :class:`ExportError` for problems the user can fix."""
    path = resolve_checkpoint(ckpt)
    if path != ckpt:
        print(f"erw_fast.export: using the latest checkpoint of {ckpt}: {path}", file=sys.stderr)
    model, steps = load_sit_for_export(path, weights)
    return export_package(
        model, out, device=device, batch=batch, dynamic_batch=dynamic_batch,
        extra_metadata={"erw.weights": weights, "erw.steps": steps if steps is not None else "unknown"},
        verbose=True,
    )

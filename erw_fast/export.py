"""Export a trained SiT as an AOTInductor package for the C++ sampler (``csrc/``, ``erw_sample``).

    python -m erw_fast.export --ckpt RUN/ckpt.pt --out model.pt2 [--device cpu|cuda] [--weights ema|model]

``--ckpt`` may also be a run folder (e.g. ``runs/erw-digits``): its latest ``checkpoints/*.pt`` is used.

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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

from .models.checkpoint import _args_dict, infer_config, load_state_dict_checked, read_checkpoint
from .models.sit import SiT

FORMAT = "erw_guided_velocity/1"
MAX_BATCH = 1 << 16

__all__ = ["GuidedVelocity", "load_sit_for_export", "export_package", "main", "FORMAT"]


class ExportError(RuntimeError):
    """A problem the user can fix (bad checkpoint, unsupported torch, bad option)."""


class GuidedVelocity(nn.Module):
    """The guided velocity of a SiT as one module with runtime guidance scale and interval."""

    def __init__(self, model: SiT, null_class: int):
        super().__init__()
        self.model = model
        self.null_class = int(null_class)

    def _cond(self, x, t32, y):
        tin = t32.expand(x.shape[0])
        return self.model(x, tin, y)[0]

    def _guided(self, x, t32, y, scale):
        xin = torch.cat([x, x])
        yin = torch.cat([y, torch.full_like(y, self.null_class)])
        tin = t32.expand(xin.shape[0])
        out = self.model(xin, tin, yin)[0]
        b = x.shape[0]
        cond, uncond = out[:b], out[b:]
        return uncond + scale * (cond - uncond)

    def forward(self, x, t, y, cfg_scale, t_lo, t_hi):
        # decide in float64, like erw_fast.sampling (its grid is float64, the model sees float32)
        use_cfg = (cfg_scale != 1.0) & (t_lo <= t) & (t <= t_hi)
        t32 = t.to(torch.float32)
        scale = cfg_scale.to(torch.float32)
        return torch.cond(
            use_cfg.reshape(()),
            lambda x, t32, y, scale: self._guided(x, t32, y, scale),
            lambda x, t32, y, scale: self._cond(x, t32, y),
            (x, t32, y, scale),
        )


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or the latest ``*.pt`` of a run folder (``RUN/checkpoints/`` or ``RUN/``)."""
    if not os.path.isdir(path):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(folder):
            found = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
            if found:  # training checkpoints are named by zero-padded step: the last is the latest
                return os.path.join(folder, found[-1])
    raise ExportError(f"no checkpoint (*.pt) found in {path} or {os.path.join(path, 'checkpoints')}")


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
    args = _args_dict(ckpt.get("args"))
    try:
        cfg = dict(args.get("model_config") or {}) or infer_config(sd, args)
        model = SiT(**cfg)
        load_state_dict_checked(model, sd, strict=True)
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


def export_package(model: SiT, out: str, device: str = "cpu", batch: int = 2, dynamic_batch: bool = True,
                   extra_metadata: Optional[dict] = None, verbose: bool = False) -> dict:
    """Export ``model``'s guided velocity to the AOTInductor package ``out``; returns the metadata."""
    inductor = _require_aoti()
    from torch.export import Dim, export

    if device not in ("cpu", "cuda"):
        raise ExportError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda was requested but torch sees no CUDA device")
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    has_null = model.y_embedder.embedding_table.num_embeddings > model.num_classes
    null_class = model.num_classes
    model = model.float().eval().to(device)
    model.set_fused(False)  # custom ops with Python bodies cannot run inside a package
    for m in model.modules():  # SDPA lowers cleanly; flash-attn / xformers are Python extensions
        if hasattr(m, "backend") and m.backend in ("auto", "flash", "xformers"):
            m.backend = "sdpa"
    wrapper = GuidedVelocity(model, null_class).eval()

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

    metadata = {
        "erw.format": FORMAT,
        "erw.input_size": str(s),
        "erw.in_channels": str(c),
        "erw.num_classes": str(model.num_classes),
        "erw.null_class": str(null_class),
        "erw.has_null_class": "1" if has_null else "0",
        "erw.batch": "dynamic" if dynamic_batch else str(batch),
        "erw.device": device,
        "erw.torch_version": torch.__version__,
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})

    t0 = time.perf_counter()
    with torch.no_grad():
        ep = export(wrapper, inputs, dynamic_shapes=shapes, strict=False)
    t1 = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    inductor.aoti_compile_and_package(
        ep, package_path=out, inductor_configs={"aot_inductor.metadata": dict(metadata)}
    )
    t2 = time.perf_counter()
    with open(out + ".json", "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    if verbose:
        print(f"export {t1 - t0:.1f}s, AOTInductor compile {t2 - t1:.1f}s -> {out}", file=sys.stderr)
    return metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m erw_fast.export",
        description="Export a SiT checkpoint's guided velocity as an AOTInductor package for erw_sample.",
    )
    p.add_argument("--ckpt", required=True, help="training checkpoint {model, ema, args, steps}, a SiT state "
                   "dict, or a run folder (its latest checkpoints/*.pt)")
    p.add_argument("--out", required=True, help="package path, e.g. model.pt2 (metadata also in <out>.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device the package runs on")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights (default: ema)")
    p.add_argument("--batch", type=int, default=2,
                   help="example batch for tracing; the fixed batch with --static-batch")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.ckpt)
        if ckpt != args.ckpt:
            print(f"erw_fast.export: using the latest checkpoint of {args.ckpt}: {ckpt}", file=sys.stderr)
        model, steps = load_sit_for_export(ckpt, args.weights)
        meta = export_package(
            model, args.out, device=args.device, batch=args.batch, dynamic_batch=not args.static_batch,
            extra_metadata={"erw.weights": args.weights, "erw.steps": steps if steps is not None else "unknown"},
            verbose=True,
        )
    except ExportError as e:
        print(f"erw_fast.export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

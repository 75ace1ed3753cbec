"""Sample a trained checkpoint: ``python -m erw_fast.sample --ckpt CKPT --num-samples N --out OUT``.

``--ckpt`` may also be a run folder (e.g. ``runs/erw-digits``): its latest checkpoint is used.

Writes ``OUT`` (if it ends in ``.npz``) or ``OUT/samples.npz``: ``arr_0`` uint8 (N, H, W, C), the
layout the ADM evaluator reads, plus ``labels`` (N,); and a PNG grid next to it (one row per class).

- EMA weights by default (``--weights model`` for the raw ones); sampler ``sde`` (REPA/ERW's
  Euler–Maruyama, 250 steps), ``ode-euler`` or ``ode-heun``; classifier-free guidance
  ``--cfg-scale`` inside ``--guidance-interval LOW,HIGH``.
- Sample i's class, initial noise and SDE noise depend only on ``(--seed, i)``: the images do not
  depend on the batch size or on the number of processes. Class of sample i:
  ``classes[i % len(classes)]`` with ``classes`` = ``--class`` (comma list) or all classes.
- Multi-GPU: ``torchrun --nproc_per_node G -m erw_fast.sample ...``; rank r takes the indices
  i ≡ r (mod G), writes a shard, and rank 0 merges the shards in index order.
- Latent models (4 input channels) are decoded with diffusers' SD-VAE (``--vae``, a local folder or
  a hub id; ``pip install diffusers``), scaled by 1/0.18215 as REPA/ERW do.
- Errors in the input (a bad flag value, a missing or damaged checkpoint) print one line
  ``error: ...`` and exit with status 2; ``--debug`` shows the traceback.

The run itself is :func:`erw_fast.sampling.generate.sample_checkpoint`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .data.vae import DEFAULT_VAE
from .sampling import SAMPLERS
from .sampling.generate import PRECISION_CHOICES, sample_checkpoint
from .utils.cli import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint {model, ema, opt, args, steps}, a state dict, "
                   "or a run folder (its latest checkpoints/*.pt)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output .npz path, or a folder (samples.npz + samples.png)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default: ema)")
    p.add_argument("--sampler", choices=SAMPLERS, default="sde")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale, finite and >= 0 "
                   "(default 1: no guidance; other values need a model trained with label dropout)")
    p.add_argument("--guidance-interval", default="0,1", help="LOW,HIGH: guide only for LOW <= t <= HIGH (t=1 noise)")
    p.add_argument("--class", dest="classes", default=None, help="class id or comma list (default: all, cycled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (default): bf16 autocast + TF32 on CUDA, fp32 on CPU; fp32 opts out; bf16-autocast "
                   "forces autocast; bf16/fp16 cast the weights")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help="SD-VAE for latent models: folder or hub id (the one the latents were made with; "
                        "REPA's generate.py uses sd-vae-ft-ema)")
    p.add_argument("--grid-per-class", type=int, default=8, help="images per class row in the PNG grid")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on a non-terminal the bar "
                   "prints a line at most every 10 s, and the last one)")
    add_debug_flag(p)
    return p


def main(argv=None, rank: Optional[int] = None, world_size: Optional[int] = None) -> dict:
    """Run the CLI; errors are raised (``python -m`` turns them into one ``error:`` line, see
    :func:`erw_fast.utils.cli.run_cli`). ``rank``/``world_size`` simulate a multi-process run (no
    process group)."""
    a = build_parser().parse_args(argv)
    return sample_checkpoint(
        a.ckpt, a.num_samples, a.out, weights=a.weights, sampler=a.sampler, steps=a.steps, cfg_scale=a.cfg_scale,
        guidance_interval=a.guidance_interval, classes=a.classes, seed=a.seed, batch_size=a.batch_size,
        precision=a.precision, device=a.device, vae=a.vae, grid_per_class=a.grid_per_class, png=not a.no_png,
        show_progress=not a.no_progress, rank=rank, world_size=world_size)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Encode an image folder into SD-VAE latent shards: ``python -m erw_fast.preprocess``.

    python -m erw_fast.preprocess --images /data/imagenet/train --out /data/in256 --resolution 256
    torchrun --nproc_per_node 8 -m erw_fast.preprocess --images ... --out ...      # multi-GPU

Input: one sub-folder per class (ImageNet layout; classes are the sorted sub-folder names, label =
position), or ``--from-repa DIR`` to convert REPA's preprocessed layout (``images/`` + ``vae-sd/``)
into shards without re-encoding. Each image is ADM-centre-cropped to ``--resolution`` (BOX halving
while the short side is >= 2× the target, BICUBIC resize, centre crop), encoded with diffusers'
``AutoencoderKL`` (``--vae``: a local folder or a hub id, default ``stabilityai/sd-vae-ft-mse``), and
stored as posterior mean ‖ std (fp16), label and the cropped uint8 image, in fixed-size shards (see
``erw_fast/data/shards.py`` for the format).

Resumable: a finished shard (its ``.json`` marker written last, files complete) is kept and
skipped on a rerun with the same ``--out``; a partial one is redone. With ``torchrun`` every rank
encodes shards ``k ≡ rank (mod world)`` and rank 0 writes ``index.json`` when all are done.

Errors (a missing folder, a bad image, a missing VAE or diffusers) print one line ``error: ...``
and exit with status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys

from .data.prepare import preprocess
from .data.vae import DEFAULT_VAE
from .utils.cli import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="image folder with one sub-folder per class (ImageNet train layout)")
    p.add_argument("--from-repa", metavar="DIR", help="instead of --images: convert REPA's preprocessed layout "
                   "(DIR/images + DIR/vae-sd + dataset.json) to shards, no VAE needed")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--resolution", type=int, default=256, help="crop size: 256 or 512 (default 256)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"diffusers AutoencoderKL: a local folder or a hub id "
                   f"(default {DEFAULT_VAE}; hub ids need the HF cache or internet)")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="VAE compute dtype")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward, per process (default 64)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding workers per process (default 4)")
    p.add_argument("--small-images", default="error", choices=("error", "upscale"),
                   help="images smaller than the crop: stop with an error naming the file (default), or upscale "
                   "them (ADM/REPA behaviour)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; the local "
                   "rank's GPU under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_debug_flag(p)
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preprocess(images=args.images, out=args.out, resolution=args.resolution, vae=args.vae,
               batch_size=args.batch_size, shard_size=args.shard_size, workers=args.workers,
               small_images=args.small_images, vae_dtype=args.vae_dtype, from_repa=args.from_repa,
               progress=args.progress, device=args.device)
    return 0


def main(argv=None) -> int:
    """The command line: errors as one ``error: ...`` line and status 2 (see :func:`erw_fast.utils.cli.run_cli`)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

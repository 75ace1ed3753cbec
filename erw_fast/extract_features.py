"""Pre-extract target-encoder features next to the latents: ``python -m erw_fast.extract_features``.

    python -m erw_fast.extract_features --data /data/in256 --encoder dinov2-vit-b [--encoder-path DIR]
    torchrun --nproc_per_node 8 -m erw_fast.extract_features --data /data/in256 --encoder dinov2-vit-b

Writes ``<data>/features/<encoder>/shard-*.npy`` ((n, T, C) float16, one shard per latent shard) and
an ``index.json`` (encoder, token grid, width, count). Resumable like preprocessing (finished shards
are kept; a partial one is redone). Training with ``--features precomputed`` then reads these
instead of running the encoder (and does not read the images). fp16 storage: DINOv2-B at 256 px is
256 × 768 × 2 B = 384 KB per image (~490 GB for ImageNet-1k, half of an fp32 store).

Errors (a missing dataset or encoder, a bad option) print one line ``error: ...`` and exit with
status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys

from .data.features import extract_features
from .utils.cli import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="latent dataset folder (preprocess output, or REPA's layout)")
    p.add_argument("--encoder", default="dinov2-vit-b", help="target encoder name (default dinov2-vit-b)")
    p.add_argument("--encoder-path", help="local weights: a transformers save_pretrained folder or a torch.hub "
                   "dinov2 repository clone (default: the HF / torch hub cache, or a download when online)")
    p.add_argument("--encoder-source", default="auto", choices=("auto", "transformers", "hub"))
    p.add_argument("--model-patch", type=int, default=2, help="the SiT patch size the features are for: token grid "
                   "= latent side / patch (default 2: 16x16 tokens at 256 px)")
    p.add_argument("--token-grid", type=int, help="override the token grid directly")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (default 64)")
    p.add_argument("--out", help="feature folder (default DATA/features/ENCODER, where training looks)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="encoder compute precision: auto = as online training does (bf16 autocast on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; the local "
                   "rank's GPU under torchrun)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_debug_flag(p)
    return p


def _main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    extract_features(a.data, a.encoder, a.encoder_path, a.encoder_source, a.token_grid, a.model_patch,
                     a.batch_size, a.out, a.device, a.progress, precision=a.precision)
    return 0


def main(argv=None) -> int:
    """The command line: errors as one ``error: ...`` line and status 2 (see :func:`erw_fast.utils.cli.run_cli`)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

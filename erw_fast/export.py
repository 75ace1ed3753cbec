"""Export a trained SiT as an AOTInductor package for the C++ sampler (``csrc/``, ``erw_sample``).

    python -m erw_fast.export --ckpt RUN/ckpt.pt --out model.pt2 [--device cpu|cuda] [--weights ema|model]

``--ckpt`` may also be a run folder (e.g. ``runs/erw-digits``): its latest checkpoint is used.
What goes into the package (the guided velocity), its inputs and its metadata are described in
:mod:`erw_fast.sampling.export`, the library this CLI calls. The package is built under a temporary
name beside ``--out`` and renamed at the end: a failed export leaves an existing ``--out`` as it was.
Prints the metadata as JSON. Problems the user can fix (bad checkpoint, unsupported torch, bad
option, a failing compiler) print one line ``error: ...`` and exit with status 2; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .sampling.export import export_checkpoint
from .utils.cli import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m erw_fast.export",
        description="Export a SiT checkpoint's guided velocity as an AOTInductor package for erw_sample.",
    )
    p.add_argument("--ckpt", required=True, help="training checkpoint {model, ema, args, steps}, a SiT state "
                   "dict, or a run folder (its latest checkpoints/*.pt)")
    p.add_argument("--out", required=True, help="package path, e.g. model.pt2 (metadata also in <out>.json); "
                   "replaced only when the new package is complete")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device the package runs on")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights (default: ema)")
    p.add_argument("--batch", type=int, default=2,
                   help="example batch for tracing; the fixed batch with --static-batch")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    add_debug_flag(p)
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:  # a torch-internal deprecation that torch.export triggers; nothing the user can act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    meta = export_checkpoint(args.ckpt, args.out, device=args.device, weights=args.weights, batch=args.batch,
                             dynamic_batch=not args.static_batch)
    print(json.dumps(meta, sort_keys=True))
    return 0


def main(argv=None) -> int:
    """The command line: errors as one ``error: ...`` line and status 2 (see :func:`erw_fast.utils.cli.run_cli`)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

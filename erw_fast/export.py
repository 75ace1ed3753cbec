"""Export a trained SiT as an AOTInductor package for the C++ sampler (``csrc/``, ``erw_sample``).

    python -m erw_fast.export --ckpt RUN/ckpt.pt --out model.pt2 [--device cpu|cuda] [--weights ema|model]

``--ckpt`` may also be a run folder (e.g. ``runs/erw-digits``): its latest checkpoint is used.
What goes into the package (the guided velocity), its inputs and its metadata are described in
:mod:`erw_fast.sampling.export`, the library this CLI calls. Prints the metadata as JSON; exit
status 2 for problems the user can fix (bad checkpoint, unsupported torch, bad option).
"""
from __future__ import annotations

import argparse
import json
import sys

from .sampling.export import ExportError, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = export_checkpoint(args.ckpt, args.out, device=args.device, weights=args.weights, batch=args.batch,
                                 dynamic_batch=not args.static_batch)
    except ExportError as e:
        print(f"erw_fast.export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the target representation fit? ``python -m erw_fast.probe``: CKNNA of every SiT block with the
target encoder, on held-out images, clean and noised.

    python -m erw_fast.probe --ckpt runs/erw-digits/checkpoints/0000200.pt --num-images 256
    python -m erw_fast.probe --ckpt RUN --data DIR --encoder dinov2-vit-b --encoder-path P --noise-levels 0,0.5

``--ckpt`` is a checkpoint (a warmup one too) or a run folder (its latest checkpoint). For every block:
the unbiased CKNNA (Huh et al. 2024; :mod:`erw_fast.evaluation.cknna`) between its mean-pooled tokens
and the encoder's mean-pooled features of the clean images, at t = 0 and each ``--noise-levels`` t
(``x_t = (1 - t) x + t ε``, ε seeded by ``--seed``). Prints a table (block x noise level; * marks the
block the alignment loss reads) and writes the JSON (``--out``; default ``RUN/probe-<checkpoint>.json``). Values near 0: the block's
neighbourhoods have nothing in common with the encoder's; a warmup that leaves them near 0 suggests
that this representation does not suit the data. Held-out images: the digits' validation split, or
the last N samples of a latent dataset. Errors print one line ``error: ...`` (status 2; ``--debug``
for the traceback). The library behind it is :func:`erw_fast.evaluation.probe.probe_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .utils.cli import add_debug_flag, check_writable, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erw_fast.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (warmup or full training) or a run folder")
    p.add_argument("--data", default="digits", help="'digits' (the embedded dataset), imagefolder:DIR (class "
                   "folders of images, the model's resolution) or a latent dataset folder")
    p.add_argument("--encoder", default=None, help="target encoder (default: the checkpoint's own, else the data's "
                   "default: digits-ssl / dinov2-vit-b; required for a run trained without one, e.g. --method vanilla)")
    p.add_argument("--encoder-path", default=None, help="local weights for the target encoder")
    p.add_argument("--num-images", type=int, default=256, help="held-out images (> --topk + 1; the digits have 359)")
    p.add_argument("--noise-levels", default="0,0.25,0.5,0.75", help="comma-separated t in [0, 1] (t = 0 is "
                   "always included)")
    p.add_argument("--topk", type=int, default=10, help="neighbours in the kNN masks (default 10)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto", help="auto: the live weights of a "
                   "warmup checkpoint (what the transfer copies), the EMA of a full one")
    p.add_argument("--null-labels", action="store_true", help="condition on the null class, not the true labels")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--out", default=None, help="JSON output (default: probe-<checkpoint name>.json in the run folder "
                   "of --ckpt, e.g. RUN/probe-0000200.json; '' to skip)")
    add_debug_flag(p)
    return p


def default_out(ckpt: str) -> str:
    """RUN/probe-<checkpoint name>.json for a run folder or a checkpoint in RUN/checkpoints/ (else beside
    the checkpoint file): the probe's result stays with the run it describes."""
    from .models.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        folder = os.path.dirname(folder)
    return os.path.join(folder, f"probe-{os.path.splitext(os.path.basename(path))[0]}.json")


def parse_levels(text: str):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--noise-levels {text!r}: expected comma-separated numbers in [0, 1], e.g. 0,0.25,0.5")


def main(argv=None) -> dict:
    """Run the CLI; errors are raised (``python -m`` turns them into one ``error:`` line)."""
    a = build_parser().parse_args(argv)
    from .evaluation.probe import format_table, probe_checkpoint
    from .utils.distributed import pick_device

    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    out = default_out(a.ckpt) if a.out is None else a.out
    if out:
        check_writable(out, "--out")  # before the probe, not after
    result = probe_checkpoint(a.ckpt, data=a.data, encoder=a.encoder, num_images=a.num_images,
                              noise_levels=parse_levels(a.noise_levels), seed=a.seed, device=pick_device(a.device),
                              encoder_path=a.encoder_path, topk=a.topk, weights=a.weights,
                              null_labels=a.null_labels, batch_size=a.batch_size)
    print(format_table(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""FID (and digit accuracy) of a checkpoint or a sample ``.npz``: ``python -m erw_fast.evaluate``.

    python -m erw_fast.evaluate --npz samples.npz
    python -m erw_fast.evaluate --ckpt run/checkpoints/final.pt --num-samples 1000 --steps 100

Digits default: features of the embedded digits classifier (independent of the training target
encoder), reference statistics from all 1,797 embedded digits; with labels (the ``labels`` key
that ``erw_fast.sample`` writes, or the generated classes) it also reports the fraction of samples
the classifier reads as the requested digit. ImageNet: ``--feature-net inception --inception
PATH --ref REF.npz`` (REF holds ``mu``/``sigma`` from the same network, or images in ``arr_0``).
Prints one JSON line; ``--json-out`` also writes it to a file. The library behind it is
:func:`erw_fast.evaluation.samples.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys

from .evaluation.samples import evaluate


def build_parser():
    p = argparse.ArgumentParser(prog="python -m erw_fast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint to sample from (EMA weights by default)")
    src.add_argument("--npz", help="sample file with arr_0 (uint8 N×H×W×C) and optional labels")
    p.add_argument("--feature-net", default="digits", choices=("digits", "inception"))
    p.add_argument("--inception", default=None, help="local TorchScript Inception-v3 file (for --feature-net inception)")
    p.add_argument("--ref", default=None, help="reference .npz (mu/sigma or arr_0); default: the embedded digits")
    p.add_argument("--json-out", default=None)
    g = p.add_argument_group("sampling (with --ckpt)")
    g.add_argument("--num-samples", type=int, default=1000)
    g.add_argument("--weights", choices=("ema", "model"), default="ema")
    g.add_argument("--sampler", default="sde")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--cfg-scale", type=float, default=1.0)
    g.add_argument("--guidance-interval", default="0,1")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=250)
    g.add_argument("--device", default=None)
    g.add_argument("--save-npz", default=None, help="also keep the generated samples here")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    result = evaluate(a.npz, a.ckpt, feature_net=a.feature_net, inception=a.inception, ref=a.ref,
                      num_samples=a.num_samples, weights=a.weights, sampler=a.sampler, steps=a.steps,
                      cfg_scale=a.cfg_scale, guidance_interval=a.guidance_interval, seed=a.seed,
                      batch_size=a.batch_size, device=a.device, save_npz=a.save_npz,
                      show_progress=sys.stderr.isatty())
    line = json.dumps(result)
    print(line)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()

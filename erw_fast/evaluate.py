"""FID, Inception Score, precision/recall (and digit accuracy) of a checkpoint or a sample ``.npz``:
``python -m erw_fast.evaluate``.

    python -m erw_fast.evaluate --npz samples.npz
    python -m erw_fast.evaluate --ckpt run/checkpoints/final.pt --num-samples 1000 --steps 100

Digits default: features and softmax of the embedded digits classifier (independent of the training
target encoder), reference: all 1,797 embedded digits; with labels (the ``labels`` key that
``erw_fast.sample`` writes, or the generated classes) it also reports the fraction of samples the
classifier reads as the requested digit. ImageNet: ``--feature-net inception --inception PATH --ref
REF.npz``; REF may be ADM's reference batch (``VIRTUAL_imagenet256_labeled.npz``): FID against its
``mu``/``sigma``, precision/recall against its ``arr_0`` images (a REF with only one of them: FID
from it, the other metric null). Beside FID: ``inception_score`` (mean and ``inception_score_std``
over ADM's consecutive 5,000-sample splits, the last one shorter) from the feature network's class
softmax, and ``precision``/``recall`` (Kynkäänniemi et al. 2019, k = 3) in its feature space; a metric
that cannot be computed (too few samples, no class output, no reference images) is null with the
reason in ``warning``.
``--encoder E`` adds ``fd_E``: the Fréchet distance in the target encoder's space (DINOv2: its CLS
token; the digits encoders: their mean token) against --ref's ``arr_0`` images or the embedded
digits; no Inception file needed, but a model aligned to E may be favoured by it. ``sfid`` is null
(``sfid_note`` says why: the TorchScript Inception does not expose the spatial mixed_6 features).
The digits network refuses images that are not greyscale 8..16 px squares (N, S, S, 1) and labels
outside 0..9. ``--ckpt`` may be a run folder (its latest checkpoint); sampling shows a progress bar
(``--no-progress`` to hide it). Prints one JSON line; ``--json-out`` also writes it to a file.
Errors print one line ``error: ...`` (status 2; ``--debug`` for the traceback). The library behind
it is :func:`erw_fast.evaluation.samples.evaluate`; see docs/evaluation.md for how the numbers
compare with ADM's TensorFlow evaluator.
"""
from __future__ import annotations

import argparse
import json
import sys

from .evaluation.samples import evaluate
from .utils.cli import add_debug_flag, run_cli
from .utils.runlock import output_lock


def build_parser():
    p = argparse.ArgumentParser(prog="python -m erw_fast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint to sample from (EMA weights by default), or a run folder (its "
                     "latest checkpoints/*.pt)")
    src.add_argument("--npz", help="sample file with arr_0 (uint8 N×H×W×C) and optional labels (for the "
                     "digits network: greyscale N×S×S×1, 8 <= S <= 16, labels 0..9)")
    p.add_argument("--feature-net", default="digits", choices=("digits", "inception"))
    p.add_argument("--inception", default=None, help="local TorchScript Inception-v3 file (for --feature-net inception)")
    p.add_argument("--ref", default=None, help="reference .npz: mu/sigma (FID) and/or arr_0 images (FID without "
                   "mu/sigma, precision/recall), e.g. ADM's VIRTUAL_imagenet256_labeled.npz; default: the embedded digits")
    p.add_argument("--encoder", default=None, help="also fd_<encoder>: the Fréchet distance in this target encoder's "
                   "feature space (e.g. digits-ssl, digits-cnn, dinov2-vit-b: its CLS token, as FD_DINOv2 of Stein et al. "
                   "/ EDM2) against --ref's arr_0 images (default: the embedded digits); needs no Inception file")
    p.add_argument("--encoder-path", default=None, help="local weights of --encoder (e.g. a DINOv2 transformers folder)")
    p.add_argument("--json-out", default=None)
    g = p.add_argument_group("sampling (with --ckpt)")
    g.add_argument("--num-samples", type=int, default=1000)
    g.add_argument("--weights", choices=("ema", "model"), default="ema")
    g.add_argument("--sampler", default="sde")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale, finite and >= 0 (default 1: none)")
    g.add_argument("--guidance-interval", default="0,1")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=250)
    g.add_argument("--device", default=None)
    g.add_argument("--save-npz", default=None, help="also keep the generated samples here")
    g.add_argument("--no-progress", action="store_true", help="no sampling progress bar (on a non-terminal the "
                   "bar prints a line at most every 10 s, and the last one)")
    add_debug_flag(p)
    return p


def main(argv=None) -> dict:
    """Run the CLI; errors are raised (``python -m`` turns them into one ``error:`` line, see
    :func:`erw_fast.utils.cli.run_cli`)."""
    a = build_parser().parse_args(argv)
    with output_lock([(a.json_out, "--json-out", "eval.json"), (a.save_npz, "--save-npz", "eval-samples.npz")],
                     "evaluate"):
        return _run(a)


def _run(a) -> dict:
    result = evaluate(a.npz, a.ckpt, feature_net=a.feature_net, inception=a.inception, ref=a.ref,
                      num_samples=a.num_samples, weights=a.weights, sampler=a.sampler, steps=a.steps,
                      cfg_scale=a.cfg_scale, guidance_interval=a.guidance_interval, seed=a.seed,
                      batch_size=a.batch_size, device=a.device, save_npz=a.save_npz,
                      show_progress=not a.no_progress, encoder=a.encoder, encoder_path=a.encoder_path)
    line = json.dumps(result)
    print(line)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

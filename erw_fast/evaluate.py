"""FID (and digit accuracy) of a checkpoint or a sample ``.npz``: ``python -m erw_fast.evaluate``.

    python -m erw_fast.evaluate --npz samples.npz
    python -m erw_fast.evaluate --ckpt run/checkpoints/final.pt --num-samples 1000 --steps 100

Digits default: features of the embedded digits classifier (independent of the training target
encoder), reference statistics from all 1,797 embedded digits; with labels (the ``labels`` key
that ``erw_fast.sample`` writes, or the generated classes) it also reports the fraction of samples
the classifier reads as the requested digit. ImageNet: ``--feature-net inception --inception
PATH --ref REF.npz`` (REF holds ``mu``/``sigma`` from the same network, or images in ``arr_0``).
Prints one JSON line; ``--json-out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
import torch

from .metrics import (classifier_accuracy, compute_features, digits_reference_stats, feature_stats,
                      frechet_distance, get_feature_network)


def load_npz_samples(path: str):
    """``arr_0`` uint8 (N, H, W, C) and ``labels`` (or None) from a sample file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} has no 'arr_0' array (keys: {list(f.keys())})")
        arr = f["arr_0"]
        labels = f["labels"] if "labels" in f else None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    if labels is not None and len(labels) != len(arr):
        raise ValueError(f"{path}: {len(labels)} labels for {len(arr)} images")
    return arr, labels


def reference_stats(net, ref: Optional[str]):
    if ref is None:
        if net.name != "digits":
            raise ValueError("--ref REF.npz is required for feature networks other than 'digits'")
        return digits_reference_stats()
    if not os.path.isfile(ref):
        raise FileNotFoundError(f"reference file not found: {ref}")
    with np.load(ref, allow_pickle=False) as f:
        if "mu" in f and "sigma" in f:
            return f["mu"], f["sigma"]
        if "arr_0" in f:
            return feature_stats(compute_features(f["arr_0"], net))
    raise ValueError(f"{ref}: expected 'mu' and 'sigma' or images in 'arr_0'")


def evaluate_samples(arr: np.ndarray, labels=None, feature_net: str = "digits", net_path: Optional[str] = None,
                     ref: Optional[str] = None, device="cpu") -> dict:
    """FID (and digits conditional accuracy when labels are given) of uint8 (N, H, W, C) samples."""
    if len(arr) < 2:
        raise ValueError(f"FID needs at least 2 samples, got {len(arr)}")
    net = get_feature_network(feature_net, net_path, device)
    mu_r, sigma_r = reference_stats(net, ref)
    mu, sigma = feature_stats(compute_features(arr, net))
    out = {"fid": frechet_distance(mu, sigma, mu_r, sigma_r), "num_samples": int(len(arr)),
           "feature_net": net.name}
    if len(arr) <= mu.shape[0]:
        out["warning"] = f"{len(arr)} samples for {mu.shape[0]}-d features: the covariance is singular, FID is biased"
    if labels is not None and net.name == "digits":
        out["accuracy"] = classifier_accuracy(arr, labels, net)
    return out


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
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.npz:
        arr, labels = load_npz_samples(a.npz)
    else:
        from .sample import generate, load_model, parse_classes, parse_interval
        from .sampling import SAMPLERS

        if a.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {a.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if a.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2, got {a.num_samples}")
        interval = parse_interval(a.guidance_interval)
        model = load_model(a.ckpt, a.weights, device)
        if model.in_channels == 4:
            raise NotImplementedError("evaluate --ckpt samples pixel models only; for latent models run "
                                      "`python -m erw_fast.sample` (SD-VAE decode) and pass --npz")
        shape = (model.in_channels, model.input_size, model.input_size)
        arr, labels = generate(model, range(a.num_samples), shape, parse_classes(None, model.num_classes),
                               seed=a.seed, sampler=a.sampler, steps=a.steps, cfg_scale=a.cfg_scale,
                               guidance_interval=interval, batch_size=a.batch_size,
                               show_progress=sys.stderr.isatty())
        if a.save_npz:
            np.savez(a.save_npz, arr_0=arr, labels=labels)
    net_path = a.inception if a.feature_net == "inception" else None
    result = evaluate_samples(arr, labels, a.feature_net, net_path, a.ref, device="cpu" if a.feature_net == "digits" else device)
    if a.ckpt:
        result.update(ckpt=a.ckpt, weights=a.weights, sampler=a.sampler, steps=a.steps, cfg_scale=a.cfg_scale,
                      guidance_interval=list(parse_interval(a.guidance_interval)), seed=a.seed)
    else:
        result["npz"] = a.npz
    line = json.dumps(result)
    print(line)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()

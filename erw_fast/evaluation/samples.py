"""FID (and digit accuracy) of a sample file or of fresh samples from a checkpoint: the library
behind ``python -m erw_fast.evaluate``.

Digits default: features of the embedded digits classifier (independent of the training target
encoder), reference statistics from all 1,797 embedded digits; with labels (the ``labels`` key
that ``erw_fast.sample`` writes, or the generated classes) it also reports the fraction of samples
the classifier reads as the requested digit. ImageNet: ``feature_net="inception"`` with a local
Inception file and ``ref`` (``mu``/``sigma`` from the same network, or images in ``arr_0``).

The digits network refuses what it cannot score honestly: images that are not greyscale digits of
8 to 16 pixels square (an RGB or ImageNet-sized file would otherwise be averaged to grey and
resized), and labels outside the digit classes 0..9 (they would count as misread).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from ..metrics import (classifier_accuracy, compute_features, digits_reference_stats, feature_stats,
                       frechet_distance, get_feature_network)
from ..sampling import SAMPLERS
from ..sampling.generate import (check_request, checkpoint_path, generate, load_model, parse_classes,
                                  parse_interval)

__all__ = ["load_npz_samples", "reference_stats", "check_digits_input", "evaluate_samples", "sample_for_evaluation",
           "evaluate"]

DIGITS_SIZES = (8, 16)  # the embedded digits' own size .. the classifier's input (and the reference's) size
DIGITS_CLASSES = 10


def check_digits_input(arr, labels=None, source: str = "samples"):
    """ValueError unless ``arr`` (images, or their shape) is greyscale digits (N, S, S, 1) with
    8 <= S <= 16 and ``labels`` (when given) are integers in 0..9: what the digits feature network
    and its reference can score."""
    shape = tuple(getattr(arr, "shape", arr))
    lo, hi = DIGITS_SIZES
    if len(shape) != 4 or shape[3] != 1 or shape[1] != shape[2] or not lo <= shape[1] <= hi:
        raise ValueError(
            f"{source}: images of shape {shape} (N, H, W, C), but the digits feature network scores greyscale "
            f"digits (N, S, S, 1) with {lo} <= S <= {hi}; for other images use --feature-net inception "
            "--inception FILE --ref REF.npz")
    if labels is None:
        return
    lab = np.asarray(labels)
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{source}: labels are {lab.dtype}, but the digits classifier reads integer classes "
                         f"0..{DIGITS_CLASSES - 1}; drop the labels key to get FID alone")
    if lab.size and (lab.min() < 0 or lab.max() >= DIGITS_CLASSES):
        raise ValueError(f"{source}: labels range {lab.min()}..{lab.max()}, but the digits classifier reads the "
                         f"classes 0..{DIGITS_CLASSES - 1} (any other label would count as misread); drop the "
                         "labels key to get FID alone")


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
    """(mu, sigma) of ``ref`` (mu/sigma, or images in arr_0), or of the embedded digits."""
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
            if net.name == "digits":
                check_digits_input(f["arr_0"], source=f"--ref {ref}")
            return feature_stats(compute_features(f["arr_0"], net))
    raise ValueError(f"{ref}: expected 'mu' and 'sigma' or images in 'arr_0'")


def evaluate_samples(arr: np.ndarray, labels=None, feature_net: str = "digits", net_path: Optional[str] = None,
                     ref: Optional[str] = None, device="cpu", source: str = "samples") -> dict:
    """FID (and digits conditional accuracy when labels are given) of uint8 (N, H, W, C) samples;
    ``source`` names them in errors."""
    if len(arr) < 2:
        raise ValueError(f"{source}: FID needs at least 2 samples, got {len(arr)}")
    if feature_net == "digits":  # before loading the network: refuse what it cannot score
        check_digits_input(arr, labels, source)
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


def sample_for_evaluation(ckpt: str, num_samples: int, *, weights: str = "ema", sampler: str = "sde",
                          steps: int = 250, cfg_scale: float = 1.0, guidance_interval: str = "0,1", seed: int = 0,
                          batch_size: int = 250, device="cpu", save_npz: Optional[str] = None,
                          show_progress: bool = False, feature_net: Optional[str] = None):
    """uint8 samples (all classes, cycled) and labels of a pixel-space checkpoint (a file or a run folder).
    ``feature_net="digits"`` refuses, before sampling, a model whose samples it could not score."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2, got {num_samples}")
    interval = parse_interval(guidance_interval)
    model = load_model(ckpt, weights, device)
    if model.in_channels == 4:
        raise ValueError(f"--ckpt {ckpt}: evaluate --ckpt samples pixel models only; for latent models run "
                         "`python -m erw_fast.sample` (SD-VAE decode) and pass --npz")
    check_request(num_samples, steps, batch_size, cfg_scale, model)
    shape = (model.in_channels, model.input_size, model.input_size)
    if feature_net == "digits":
        check_digits_input((num_samples, shape[1], shape[2], shape[0]), source=f"--ckpt {ckpt}")
        if model.num_classes > DIGITS_CLASSES:
            raise ValueError(f"--ckpt {ckpt}: the model has {model.num_classes} classes, but the digits classifier "
                             f"reads the classes 0..{DIGITS_CLASSES - 1}; use --feature-net inception")
    arr, labels = generate(model, range(num_samples), shape, parse_classes(None, model.num_classes),
                           seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                           guidance_interval=interval, batch_size=batch_size, show_progress=show_progress)
    if save_npz:
        np.savez(save_npz, arr_0=arr, labels=labels)
    return arr, labels


def evaluate(npz: Optional[str] = None, ckpt: Optional[str] = None, *, feature_net: str = "digits",
             inception: Optional[str] = None, ref: Optional[str] = None, num_samples: int = 1000,
             weights: str = "ema", sampler: str = "sde", steps: int = 250, cfg_scale: float = 1.0,
             guidance_interval: str = "0,1", seed: int = 0, batch_size: int = 250, device: Optional[str] = None,
             save_npz: Optional[str] = None, show_progress: bool = False) -> dict:
    """The result dictionary of ``python -m erw_fast.evaluate``: FID of ``npz``, or of
    ``num_samples`` fresh samples of ``ckpt`` (a file or a run folder: its latest checkpoint)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if npz:
        arr, labels = load_npz_samples(npz)
        source = npz
    else:
        ckpt = checkpoint_path(ckpt)
        source = f"samples of {ckpt}"
        arr, labels = sample_for_evaluation(
            ckpt, num_samples, weights=weights, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
            guidance_interval=guidance_interval, seed=seed, batch_size=batch_size, device=device,
            save_npz=save_npz, show_progress=show_progress, feature_net=feature_net)
    net_path = inception if feature_net == "inception" else None
    result = evaluate_samples(arr, labels, feature_net, net_path, ref,
                              device="cpu" if feature_net == "digits" else device, source=source)
    if ckpt:
        result.update(ckpt=ckpt, weights=weights, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                      guidance_interval=list(parse_interval(guidance_interval)), seed=seed)
    else:
        result["npz"] = npz
    return result

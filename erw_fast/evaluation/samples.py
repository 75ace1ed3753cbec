"""FID, Inception Score, precision/recall (and digit accuracy) of a sample file or of fresh samples
from a checkpoint: the library behind ``python -m erw_fast.evaluate``.

Digits default: features and softmax of the embedded digits classifier (independent of the training
target encoder), reference: all 1,797 embedded digits; with labels (the ``labels`` key that
``erw_fast.sample`` writes, or the generated classes) it also reports the fraction of samples the
classifier reads as the requested digit. ImageNet: ``feature_net="inception"`` with a local
Inception file and ``ref`` (an ADM reference batch: ``mu``/``sigma`` for FID, ``arr_0`` images for
precision/recall; or only one of them).

The digits network refuses what it cannot score honestly: images that are not greyscale digits of
8 to 16 pixels square (an RGB or ImageNet-sized file would otherwise be averaged to grey and
resized), and labels outside the digit classes 0..9 (they would count as misread).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Optional

import numpy as np
import torch

from ..metrics import (IS_SPLIT_SIZE, check_covariance, classifier_accuracy, compute_features,
                       compute_features_and_probs, digits_reference_features,
                       digits_reference_stats, feature_stats, frechet_distance, get_feature_network, inception_score,
                       precision_recall)
from ..sampling import SAMPLERS
from ..utils.cli import check_writable
from ..sampling.generate import (check_request, checkpoint_path, generate, load_model, parse_classes,
                                  parse_interval)

__all__ = ["scoring_setup", "read_npz", "check_labels", "load_npz_samples", "load_reference", "reference",
           "reference_stats", "check_digits_input", "encoder_fd",
           "evaluate_samples", "sample_for_evaluation", "evaluate"]

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


def read_npz(path: str, flag: str, keys) -> dict:
    """The arrays ``keys`` that ``path`` holds (the others are not read), from a real ``.npz`` of
    arrays: the one place evaluation files are opened. Never unpickles (``allow_pickle=False``); a
    missing, truncated or damaged file, a pickle or a single ``.npy`` named ``.npz``, or a member that
    holds objects, is one ``ValueError`` naming ``flag FILE`` (and the key). Also returns every key."""
    where = f"{flag} {path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file not found")
    try:
        f = np.load(path, allow_pickle=False)
    except ValueError as e:  # numpy's message for pickled data (or anything unknown) suggests allow_pickle
        why = "it holds pickled data, which is never loaded" if "pickle" in str(e) else str(e)
        raise ValueError(f"{where}: not a .npz archive of arrays ({why}); write it with numpy.savez") from None
    except (EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where}: not a readable .npz archive (truncated or damaged: {e})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: a single .npy array, not a .npz archive of named arrays; write it with "
                         "numpy.savez(FILE, arr_0=..., ...)")
    out = {}
    with f:
        names = set(f.files)
        for k in keys:
            if k not in names:
                continue
            try:
                out[k] = f[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                why = "holds objects (pickled data, never loaded)" if "pickle" in str(e) else f"truncated or damaged: {e}"
                raise ValueError(f"{where}: {k}: cannot be read ({why})") from None
    return out, names


def check_labels(labels, n: int, where: str) -> np.ndarray:
    """Labels of ``n`` samples: integers of shape (n,)."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"{where}: labels: shape {lab.shape}, expected ({n},) (one class per image)")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{where}: labels: {lab.dtype}, expected integer classes")
    return lab


def _check_images(arr, where: str, key: str = "arr_0") -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"{where}: {key}: must be uint8 (N, H, W, C) with N >= 1, got {arr.dtype} {arr.shape}")
    return arr


def load_npz_samples(path: str, flag: str = "--npz"):
    """``arr_0`` uint8 (N, H, W, C) and ``labels`` (N,) integers (or None) from a sample file."""
    where = f"{flag} {path}"
    a, names = read_npz(path, flag, ("arr_0", "labels"))
    if "arr_0" not in a:
        raise ValueError(f"{where}: arr_0: missing (keys: {sorted(names)}); a sample file holds uint8 images in arr_0")
    arr = _check_images(a["arr_0"], where)
    labels = check_labels(a["labels"], len(arr), where) if "labels" in a else None
    return arr, labels


def load_reference(path: str, flag: str = "--ref", images: bool = True) -> dict:
    """A reference batch: ``{"images": uint8 (N, H, W, C) or None, "mu": (D,) or None, "sigma": (D, D)
    or None}``, every part checked (finite ``mu``; ``sigma`` symmetric PSD, ``metrics.check_covariance``).
    Reads ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images and ``mu``/
    ``sigma`` pool3 statistics) and our own files; other keys (ADM's spatial ``mu_s``/``sigma_s``,
    labels) are not read. ``images=False``: ``arr_0`` is not read either (FID statistics only)."""
    where = f"{flag} {path}"
    a, keys = read_npz(path, flag, ("mu", "sigma") + (("arr_0",) if images else ()))
    if ("mu" in keys) != ("sigma" in keys):
        have, lack = ("mu", "sigma") if "mu" in keys else ("sigma", "mu")
        raise ValueError(f"{where}: {lack}: missing ({have} without {lack}); FID needs both")
    if "arr_0" not in keys and "mu" not in keys:
        raise ValueError(f"{where}: mu, sigma: missing, and no images in arr_0 (keys: {sorted(keys)})")
    mu = sigma = None
    if "mu" in a:
        mu, sigma = a["mu"], a["sigma"]
        if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
            raise ValueError(f"{where}: mu, sigma: {mu.dtype} and {sigma.dtype}, expected numbers")
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{where}: mu {mu.shape} and sigma {sigma.shape}, expected (D,) and (D, D)")
        if not np.isfinite(mu).all():
            raise ValueError(f"{where}: mu: contains NaN or inf")
        check_covariance(sigma, f"{where}: sigma")
    imgs = _check_images(a["arr_0"], where) if "arr_0" in a else None
    return {"images": imgs, "mu": mu, "sigma": sigma}


def checkpoint_digits(ckpt: str) -> list:
    """The real digit of each class of a digits checkpoint (its recorded class names: a ``--data
    digits:5-9`` run's class 0 is a 5); 0..9 when none are recorded."""
    from ..data.digits import class_digits
    from ..models.checkpoint import _args_dict, read_checkpoint

    raw = read_checkpoint(checkpoint_path(ckpt, quiet=True))
    names = _args_dict(raw.get("args")).get("class_names") if isinstance(raw, dict) else None
    return class_digits(names)


def reference(net, ref: Optional[str], features: bool = True, digits=None, flag: str = "--ref"):
    """(mu, sigma, features or None) of the reference for ``net``: ``ref``'s ``mu``/``sigma`` when it
    has them (as ADM: FID against the file's statistics), else those of its ``arr_0`` images;
    features of its ``arr_0`` images (precision/recall; None without images, or with ``features=False``
    when the file has ``mu``/``sigma``). No ``ref``: the embedded digits (digits network only; only
    the images of ``digits`` when given, the reference of a ``digits:0-4`` run)."""
    if ref is None:
        if net.name != "digits":
            raise ValueError(f"{flag} REF.npz is required for feature networks other than 'digits'")
        mu, sigma = digits_reference_stats(digits=digits)
        feats = digits_reference_features() if features else None
        if feats is not None and digits is not None and len(set(digits)) < DIGITS_CLASSES:
            from ..data.digits import DigitsDataset

            feats = feats[torch.isin(DigitsDataset(size=16).labels, torch.tensor(list(digits)))]
        return mu, sigma, feats
    r = load_reference(ref, flag)
    feats = None
    if r["images"] is not None and (features or r["mu"] is None):
        if net.name == "digits":
            check_digits_input(r["images"], source=f"{flag} {ref}")
        feats = compute_features(r["images"], net)
    if r["mu"] is not None:
        return r["mu"], r["sigma"], feats
    if len(feats) < 2:
        raise ValueError(f"{flag} {ref}: arr_0: FID statistics need at least 2 images, got {len(feats)}")
    return (*feature_stats(feats), feats)


def reference_stats(net, ref: Optional[str], flag: str = "--ref"):
    """(mu, sigma) of ``ref`` (mu/sigma, or images in arr_0), or of the embedded digits."""
    return reference(net, ref, features=False, flag=flag)[:2]


PR_K = 3  # ADM / Kynkäänniemi et al.: k-th nearest neighbour radii


def _score_is(probs, n: int, net_name: str, notes: list):
    """IS over ADM's 5,000-sample splits (one split below 5,000 samples)."""
    if probs is None:
        notes.append(f"inception_score: the {net_name} feature network gives no class probabilities")
        return None, None
    smallest = n % IS_SPLIT_SIZE or min(n, IS_SPLIT_SIZE)
    if smallest < probs.shape[1]:
        notes.append(f"inception_score: a split of {smallest} samples for {probs.shape[1]} classes, IS is biased low")
    return inception_score(probs, IS_SPLIT_SIZE)


def _score_pr(ref_feats, feats, ref: Optional[str], device, notes: list):
    if ref_feats is None:
        notes.append(f"precision/recall need reference images: --ref {ref} has mu/sigma but no arr_0")
        return None, None
    if len(feats) <= PR_K or len(ref_feats) <= PR_K:
        notes.append(f"precision/recall (k = {PR_K}) need more than {PR_K} samples and reference images, "
                        f"got {len(feats)} and {len(ref_feats)}")
        return None, None
    return precision_recall(ref_feats, feats, k=PR_K, device=device)


def scoring_setup(feature_net: str = "digits", net_path: Optional[str] = None, ref: Optional[str] = None,
                  device="cpu", digits=None):
    """(network, (mu, sigma, reference features or None)): what scoring needs, loaded and checked (the
    feature network's file, the reference file) before any sample is made; ``digits``: the embedded
    reference holds only these digits (a ``digits:5-9`` checkpoint's)."""
    net = get_feature_network(feature_net, net_path, device)
    return net, reference(net, ref, digits=digits)


def evaluate_samples(arr: np.ndarray, labels=None, feature_net: str = "digits", net_path: Optional[str] = None,
                     ref: Optional[str] = None, device="cpu", source: str = "samples", setup=None) -> dict:
    """FID, Inception Score (ADM's 5,000-sample splits) and precision/recall (k = 3, against the
    reference images) of uint8 (N, H, W, C) samples, and digits conditional accuracy when labels are
    given (real digits); ``source`` names them in errors; ``setup``: ``scoring_setup``'s result when
    already made (a digits subset's reference: ``scoring_setup(digits=...)``). A
    metric that cannot be computed is None, with the reason in ``warning``."""
    if len(arr) < 2:
        raise ValueError(f"{source}: FID needs at least 2 samples, got {len(arr)}")
    if feature_net == "digits":  # before loading the network: refuse what it cannot score
        check_digits_input(arr, labels, source)
    net, (mu_r, sigma_r, ref_feats) = setup or scoring_setup(feature_net, net_path, ref, device)
    feats, probs = compute_features_and_probs(arr, net)
    mu, sigma = feature_stats(feats)
    if np.shape(mu_r) != mu.shape:
        raise ValueError(f"--ref {ref}: reference mu is {np.shape(mu_r)} but the {net.name} feature network gives "
                         f"{mu.shape[0]}-d features; the reference must come from the same network")
    notes = []
    if len(arr) <= mu.shape[0]:
        notes.append(f"{len(arr)} samples for {mu.shape[0]}-d features: the covariance is singular, FID is biased")
    is_mean, is_std = _score_is(probs, len(arr), net.name, notes)
    precision, recall = _score_pr(ref_feats, feats, ref, device, notes)
    out = {"fid": frechet_distance(mu, sigma, mu_r, sigma_r), "num_samples": int(len(arr)), "feature_net": net.name,
           "inception_score": is_mean, "inception_score_std": is_std, "precision": precision, "recall": recall}
    if notes:
        out["warning"] = "; ".join(notes)
    if labels is not None and net.name == "digits":
        out["accuracy"] = classifier_accuracy(arr, labels, net)
    return out


SFID_NOTE = ("sfid: ADM's spatial FID needs Inception's mixed_6/conv spatial features (its first 7 channels), "
             "which the TorchScript Inception interface (features and class output only) does not expose; not computed")


def encoder_fd(arr: np.ndarray, encoder: str, encoder_path: Optional[str] = None, ref: Optional[str] = None,
               device="cpu") -> dict:
    """``{"fd_<encoder>": FD, "fd_reference": what it is measured against}``: the Fréchet distance in the
    target encoder's feature space (:class:`erw_fast.metrics.EncoderFeatures`: DINOv2's CLS token, a
    digits encoder's mean token) between the samples and the reference images (``ref``'s ``arr_0``; no
    ``ref``: the embedded digits). Needs no Inception file. A model aligned to this encoder may be
    favoured by it; read it beside the independent network's FID."""
    from ..encoders import build_encoder
    from ..metrics import EncoderFeatures, encoder_fd_stats, fd_name, fid_from_images

    if ref is None:
        from ..data.digits import load_digits

        images, what = load_digits(16)[0], "the embedded digits (1,797)"
    else:
        images, what = load_reference(ref)["images"], f"arr_0 of {ref}"
        if images is None:
            raise ValueError(f"fd_{encoder} needs reference images, but {ref} has only mu/sigma (no arr_0)")
    # DINOv2 at its own default grid (16 x 14 = 224 px, the input Stein et al. feed it)
    enc = build_encoder(encoder, device=device, **({"path": encoder_path} if encoder_path else {}))
    if len(arr) < 2 or len(images) < 2:
        raise ValueError(f"fd_{encoder} needs at least 2 samples and 2 reference images")
    return {fd_name(encoder): fid_from_images(arr, encoder_fd_stats(enc, images), EncoderFeatures(enc)),
            "fd_reference": what}


def sample_for_evaluation(ckpt: str, num_samples: int, *, weights: str = "ema", sampler: str = "sde",
                          steps: int = 250, cfg_scale: float = 1.0, guidance_interval: str = "0,1", seed: int = 0,
                          batch_size: int = 250, device="cpu", save_npz: Optional[str] = None,
                          show_progress: bool = False, feature_net: Optional[str] = None):
    """uint8 samples (all classes, cycled) and labels of a pixel-space checkpoint (a file or a run folder).
    ``feature_net="digits"`` refuses, before sampling, a model whose samples it could not score, and
    returns the labels as real digits (a ``digits:5-9`` model's class 0 is labelled 5)."""
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
    if feature_net == "digits":
        labels = np.asarray(checkpoint_digits(ckpt))[np.asarray(labels)]
    if save_npz:
        np.savez(save_npz, arr_0=arr, labels=labels)
    return arr, labels


def evaluate(npz: Optional[str] = None, ckpt: Optional[str] = None, *, feature_net: str = "digits",
             inception: Optional[str] = None, ref: Optional[str] = None, num_samples: int = 1000,
             weights: str = "ema", sampler: str = "sde", steps: int = 250, cfg_scale: float = 1.0,
             guidance_interval: str = "0,1", seed: int = 0, batch_size: int = 250, device: Optional[str] = None,
             save_npz: Optional[str] = None, show_progress: bool = False, encoder: Optional[str] = None,
             encoder_path: Optional[str] = None) -> dict:
    """The result dictionary of ``python -m erw_fast.evaluate``: FID of ``npz``, or of
    ``num_samples`` fresh samples of ``ckpt`` (a file or a run folder: its latest checkpoint); with
    ``encoder`` also ``fd_<encoder>`` (:func:`encoder_fd`). ``sfid`` is null with the reason in ``sfid_note``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net_path = inception if feature_net == "inception" else None
    score_device = "cpu" if feature_net == "digits" else device
    if encoder and ref and load_reference(ref)["images"] is None:  # before any sampling
        raise ValueError(f"--encoder {encoder}: fd_{encoder} needs reference images, but --ref {ref} has only "
                         "mu/sigma (no arr_0)")
    if npz:
        arr, labels = load_npz_samples(npz)
        source = npz
        setup = None
    else:
        if save_npz:
            check_writable(save_npz if save_npz.endswith(".npz") else save_npz + ".npz", "--save-npz")
        ckpt = checkpoint_path(ckpt)
        source = f"samples of {ckpt}"
        # the feature network and the reference are loaded and checked before the (long) sampling
        digits = checkpoint_digits(ckpt) if feature_net == "digits" else None
        setup = scoring_setup(feature_net, net_path, ref, score_device, digits)
        arr, labels = sample_for_evaluation(
            ckpt, num_samples, weights=weights, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
            guidance_interval=guidance_interval, seed=seed, batch_size=batch_size, device=device,
            save_npz=save_npz, show_progress=show_progress, feature_net=feature_net)
    result = evaluate_samples(arr, labels, feature_net, net_path, ref, device=score_device, source=source,
                              setup=setup)
    if encoder:
        result.update(encoder_fd(arr, encoder, encoder_path, ref, device=score_device))
    result.update(sfid=None, sfid_note=SFID_NOTE)
    if ckpt:
        result.update(ckpt=ckpt, weights=weights, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                      guidance_interval=list(parse_interval(guidance_interval)), seed=seed)
    else:
        result["npz"] = npz
    return result

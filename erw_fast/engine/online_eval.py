"""``--eval-every N --eval-samples K``: FID (and, on the digits, classifier accuracy) of the EMA model
while training. K class-balanced samples with per-index seeds (the same K images at every evaluation
but for the model), shared between the ranks, scored on rank 0: the digits feature network against
the embedded digits, or, on latent data, a local Inception file (``--inception``) against reference
statistics (``--eval-ref``, an ADM-style npz). Beside it ``fd_<encoder>`` for each of the run's target
encoders: the Fréchet distance in that encoder's space (DINOv2: its CLS token; the digits encoders:
their mean token) against the embedded digits, the image folder's images or --eval-ref's ``arr_0``;
it needs no Inception file, so an image folder without ``--inception`` gets ``fid`` null (with
``fid_note``) and the FD alone. Logged as an ``eval`` event with ``fid`` (and ``sample_accuracy``);
its time is logged apart and is not counted as training time or compute.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..utils.seeding import EVAL_SEED_OFFSET


def _generate(run, model, indices):
    from ..sampling.generate import generate

    cfg, data = run.cfg, run.data
    shape = (data.channels, data.input_size, data.input_size)
    with torch.autocast(device_type=run.dist.device.type, dtype=torch.bfloat16, enabled=run.amp):
        return generate(model, indices, shape, list(range(data.num_classes)), seed=cfg.seed + EVAL_SEED_OFFSET,
                        sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                        guidance_interval=(0.0, cfg.guidance_high), batch_size=cfg.eval_batch,
                        decoder=(lambda z: run.data.decode(z)) if data.is_latent else None,
                        step_progress=run.signals.stoppable(run.dist.world))


def _gather(arr, labels, indices, world: int, share: bool):
    """Every rank's samples on rank 0, in index order (None elsewhere)."""
    if not share or world == 1:
        return arr, labels
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object((list(indices), arr, labels), parts, dst=0)
    if parts is None:
        return None, None
    parts = [p for p in parts if len(p[0])]  # ranks with no sample (K < world) send nothing
    order = np.argsort(np.concatenate([np.asarray(p[0]) for p in parts]))
    return np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def _fd_reference(run):
    """(images, description) that ``fd_<encoder>`` is measured against: all embedded digits, the image
    folder's own images, or --eval-ref's ``arr_0``; (None, reason) when there are none."""
    from ..data.digits import class_digits, is_digits, load_digits
    from ..data.imagefolder import image_folder_path

    cfg = run.cfg
    if is_digits(cfg.data):  # the run's digits (all ten, or a subset such as digits:5-9)
        x, y = load_digits(16)
        return x[torch.isin(y, torch.tensor(class_digits(cfg.class_names)))], "the embedded digits"
    if image_folder_path(cfg.data) is not None:
        return run.data.images.float() / 127.5 - 1.0, "the image folder"  # uint8 (N, C, R, R) → [-1, 1]
    if cfg.eval_ref:
        from ..evaluation.samples import load_reference

        images = load_reference(cfg.eval_ref)["images"]
        if images is not None:
            return images, f"arr_0 of {cfg.eval_ref}"
    return None, "no reference images (--eval-ref with arr_0 images)"


def _fd_spaces(run) -> list:
    """Per target encoder of the run: (fd name, feature network, reference (mu, sigma)), built at the
    first evaluation and kept on the run (the encoder itself, not the run's precomputed feature table)."""
    cached = getattr(run, "_fd_spaces", None)
    if cached is not None:
        return cached
    from ..encoders import build_encoder
    from ..metrics import EncoderFeatures, encoder_fd_stats

    cfg, spaces = run.cfg, []
    images, _ = _fd_reference(run)
    names = [n.strip() for n in (cfg.encoder or "").split(",") if n.strip() and n.strip() != "none"]
    paths = [q.strip() for q in cfg.encoder_path.split(",")] if cfg.encoder_path else [""] * len(names)
    if images is not None and run.encoders:
        for name, path in zip(names, paths):
            enc = build_encoder(name, device="cpu", **({"path": path} if path else {}))
            spaces.append((f"fd_{name}", EncoderFeatures(enc), encoder_fd_stats(enc, images)))
    run._fd_spaces = spaces
    return spaces


def _score(run, arr, labels) -> dict:
    from ..evaluation.samples import reference_stats
    from ..data.digits import class_digits, is_digits
    from ..metrics import (classifier_accuracy, compute_features, digits_reference_stats, feature_stats,
                           frechet_distance, get_feature_network)

    cfg = run.cfg
    name = "digits" if is_digits(cfg.data) else "inception"  # latent data and image folders: --inception
    out = {}
    if name == "digits" or cfg.inception:
        net = get_feature_network(name, cfg.inception if name == "inception" else None)
        if name == "digits":  # a subset of the digits (digits:0-4): its own images, class k scored as its digit
            digits = class_digits(cfg.class_names)
            ref = digits_reference_stats(digits=digits)
        else:
            ref = reference_stats(net, cfg.eval_ref, flag="--eval-ref")
        out["fid"] = frechet_distance(*feature_stats(compute_features(arr, net)), *ref)
    else:
        out.update(fid=None, fid_note="no --inception file: FID not computed")
    if name == "digits":
        out["sample_accuracy"] = classifier_accuracy(arr, np.asarray(digits)[np.asarray(labels)], net)
    for fd, enc_net, enc_ref in _fd_spaces(run):
        out[fd] = frechet_distance(*feature_stats(compute_features(arr, enc_net)), *enc_ref)
    return out


def evaluate_online(run, model, step: int, share: bool = True) -> Optional[dict]:
    """Sample, gather, score; returns the logged record on rank 0 (None elsewhere). Collective."""
    d, t0 = run.dist, time.time()
    K = run.cfg.eval_samples
    indices = range(d.rank, K, d.world) if share else (range(K) if d.main else range(0))
    if model is not None:  # None: a rank that only takes part in the collectives (FSDP)
        model.eval()
    arr, labels = _generate(run, model, list(indices)) if len(indices) else (None, None)
    arr, labels = _gather(arr, labels, indices, d.world, share)
    rec = None
    if d.main:
        rec = {"event": "eval", "phase": "eval", "step": step, "num_samples": K, **_score(run, arr, labels)}
        rec["eval_seconds"] = time.time() - t0
        run.log.write(rec)
        msg = f"eval @ {step}: FID " + (f"{rec['fid']:.2f}" if rec["fid"] is not None else "n/a (no --inception)")
        msg += "".join(f", {k} {v:.3g}" for k, v in rec.items() if k.startswith("fd_"))
        if "sample_accuracy" in rec:
            msg += f", accuracy {rec['sample_accuracy'] * 100:.1f}%"
        run.bar.message(msg + f" ({K} samples, {rec['eval_seconds']:.1f} s, not counted as training time)")
    return rec

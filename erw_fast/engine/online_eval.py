"""``--eval-every N --eval-samples K``: FID (and, on the digits, classifier accuracy) of the EMA model
while training. K class-balanced samples with per-index seeds (the same K images at every evaluation
but for the model), shared between the ranks, scored on rank 0: the digits feature network against
the embedded digits, or, on latent data, a local Inception file (``--inception``) against reference
statistics (``--eval-ref``, an ADM-style npz). Logged as an ``eval`` event with ``fid`` (and
``sample_accuracy``); its time is logged apart and is not counted as training time or compute.
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


def _score(run, arr, labels) -> dict:
    from ..evaluation.samples import reference_stats
    from ..data.digits import class_digits, is_digits
    from ..metrics import (classifier_accuracy, compute_features, digits_reference_stats, feature_stats,
                           frechet_distance, get_feature_network)

    cfg = run.cfg
    name = "digits" if is_digits(cfg.data) else "inception"  # latent data and image folders: --inception
    net = get_feature_network(name, cfg.inception if name == "inception" else None)
    if name == "digits":  # a subset of the digits (digits:0-4): its own images, class k scored as its digit
        digits = class_digits(cfg.class_names)
        ref = digits_reference_stats(digits=digits)
    else:
        ref = reference_stats(net, cfg.eval_ref, flag="--eval-ref")
    out = {"fid": frechet_distance(*feature_stats(compute_features(arr, net)), *ref)}
    if name == "digits":
        out["sample_accuracy"] = classifier_accuracy(arr, np.asarray(digits)[np.asarray(labels)], net)
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
        msg = f"eval @ {step}: FID {rec['fid']:.2f}"
        if "sample_accuracy" in rec:
            msg += f", accuracy {rec['sample_accuracy'] * 100:.1f}%"
        run.bar.message(msg + f" ({K} samples, {rec['eval_seconds']:.1f} s, not counted as training time)")
    return rec

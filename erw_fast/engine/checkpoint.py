"""Training checkpoints: atomic writes, reading one back, the run folder, and resuming.

A checkpoint is REPA's layout ``{model, ema, opt, args, steps}`` plus what an exact resume needs
(phase, phase step, transfer record, warmup cost, seconds so far, the torch RNG state). ``args`` is
a plain dict, so ``torch.load(weights_only=True)`` reads the file. Which file is the latest is
decided in ``erw_fast.models.checkpoint.list_checkpoints``.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..models.checkpoint import list_checkpoints, read_checkpoint
from .config import RESUME_FROM_CALL, RESUME_OVERRIDABLE, TrainConfig

FORMAT = "erw_fast.train/1"
TRAINING_KEYS = ("model", "ema", "opt", "args", "steps", "phase", "phase_step")


def save_atomic(obj, path: str):
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"{step:07d}.pt")


def read_training_checkpoint(path: str) -> dict:
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in TRAINING_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an erw_fast training checkpoint (needs {TRAINING_KEYS}; has {have})")
    return ckpt


def folder_holds_run(out: str) -> bool:
    return os.path.isdir(out) and (
        os.path.exists(os.path.join(out, "metrics.jsonl")) or bool(list_checkpoints(out))
        or os.path.exists(os.path.join(out, "config.json"))
    )


def find_resume_checkpoint(config: TrainConfig) -> str:
    if config.resume in ("auto", "latest", ""):
        ckpts = list_checkpoints(config.out)
        if not ckpts:
            raise FileNotFoundError(f"--resume: no checkpoint found under {os.path.join(config.out, 'checkpoints')}")
        return ckpts[-1]
    return config.resume


def resume_config(config: TrainConfig, ckpt_args: dict) -> TrainConfig:
    """The checkpoint's settings, with what a new call may change taken from ``config``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in ckpt_args.items() if k in names})
    for k in RESUME_OVERRIDABLE:
        v = getattr(config, k)
        if v is not None:
            setattr(base, k, v)
    for k in RESUME_FROM_CALL:
        setattr(base, k, getattr(config, k))
    return base

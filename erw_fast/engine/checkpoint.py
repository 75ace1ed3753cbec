"""Training checkpoints: atomic writes, reading one back, the run folder, and resuming.

A checkpoint is REPA's layout ``{model, ema, opt, args, steps}`` plus what an exact resume needs
(phase, phase step, transfer record, warmup cost, seconds so far, the torch RNG state). ``args`` is
a plain dict, so ``torch.load(weights_only=True)`` reads the file. Which file is the latest is
decided in ``erw_fast.models.checkpoint.list_checkpoints``.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import sys
from typing import List, Optional

import torch

from ..models.checkpoint import CHECKSUM_KEY, CorruptCheckpointError, content_checksum, list_checkpoints, read_checkpoint
from .config import RESUME_FROM_CALL, RESUME_OVERRIDABLE, TrainConfig, config_from_checkpoint_args, resolve_config

FORMAT = "erw_fast.train/1"
TRAINING_KEYS = ("model", "ema", "opt", "args", "steps", "phase", "phase_step")


LOW_SPACE_BYTES = 64 << 20


def save_atomic(obj, path: str):
    """torch.save (with a content checksum for dict payloads) to a temp file in the same folder, then
    rename over ``path``. A failed write leaves the old file; a full or read-only disk is an OSError
    that names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: content_checksum(obj)}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    except RuntimeError as e:  # torch's writer reports a full disk as "unexpected pos ..."
        if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device", path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(out: str) -> int:
    """Delete ``*.pt.tmp*`` left by writes that were killed; returns how many."""
    stale = glob.glob(os.path.join(out, "checkpoints", "*.pt.tmp*"))
    for f in stale:
        os.remove(f)
    return len(stale)


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


def folder_holds_checkpoints(out: str) -> bool:
    return bool(list_checkpoints(out))


def clear_failed_start(out: str) -> bool:
    """A folder left by a run that never reached a checkpoint (a failed start, a double Ctrl-C) is
    reused: its config and log are removed. Returns whether there was anything to clear."""
    if not folder_holds_run(out) or folder_holds_checkpoints(out):
        return False
    for name in ("metrics.jsonl", "config.json"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            os.remove(p)
    return True


def open_resume_checkpoint(config: TrainConfig):
    """(path, checkpoint) to resume from. ``--resume`` alone: the latest good checkpoint in ``--out``
    (a damaged latest one is skipped, with a note); ``--resume PATH``: that file, which must belong to
    ``--out`` unless ``--out`` holds no run yet."""
    if config.resume not in ("auto", "latest", ""):
        path = config.resume
        _check_belongs(path, config.out)
        return path, read_training_checkpoint(path)
    ckpts = list_checkpoints(config.out)
    if not ckpts:
        hint = (" (it holds no checkpoint: start without --resume and it is reused)" if folder_holds_run(config.out)
                else "")
        raise FileNotFoundError(f"--resume: no checkpoint found under {os.path.join(config.out, 'checkpoints')}{hint}")
    for path in reversed(ckpts):
        try:
            return path, read_training_checkpoint(path)
        except CorruptCheckpointError as e:
            print(f"note: {e}; trying the previous checkpoint", file=sys.stderr)
    raise CorruptCheckpointError(f"--resume: every checkpoint under {os.path.join(config.out, 'checkpoints')} is damaged")


def _check_belongs(path: str, out: str):
    own = os.path.realpath(os.path.join(out, "checkpoints"))
    if os.path.dirname(os.path.realpath(path)) != own and folder_holds_run(out):
        raise ValueError(f"--resume {path} belongs to another run than --out {out}, which holds a run of its own; "
                         f"resuming would mix the two. Use --out {os.path.dirname(os.path.dirname(path)) or '.'} "
                         "or an empty --out")


def _row_step(row) -> Optional[int]:
    """The step of a log row (0 for events without one); None for a row that is not a JSON object or
    whose step is not an integer."""
    if not isinstance(row, dict):
        return None
    v = row.get("step", row.get("steps", 0))
    if v is None:
        return 0
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def truncate_metrics(out: str, step: int) -> List[int]:
    """Cut ``metrics.jsonl`` back to where the checkpoint of ``step`` was written (its ``checkpoint``
    event; without one, to the rows of steps <= ``step``), so a resumed run logs no step twice and no
    event twice. A last line half-written by a killed process is dropped; so are lines that are not log
    records (not JSON, not an object, a step that is not an integer): their line numbers are returned
    for the caller's note."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
            if i == len(lines) or not line.strip():  # a killed write's partial last line; blank lines
                continue
        if _row_step(row) is None:
            bad.append(i)
        else:
            rows.append(row)
    marks = [i for i, r in enumerate(rows) if r.get("event") == "checkpoint" and r.get("steps") == step]
    if marks:
        keep = rows[:marks[-1] + 1]
    else:
        keep = [r for r in rows if _row_step(r) <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    return bad


def set_aside_newer_checkpoints(out: str, step: int) -> list:
    """Resuming from an older checkpoint abandons the newer ones: they move to
    ``checkpoints/abandoned/`` (kept, but no longer the run's latest)."""
    newer = [p for p in list_checkpoints(out) if int(os.path.basename(p)[:-3]) > step]
    if newer:
        folder = os.path.join(out, "checkpoints", "abandoned")
        os.makedirs(folder, exist_ok=True)
        for p in newer:
            os.replace(p, os.path.join(folder, os.path.basename(p)))
    return newer


def resume_config(config: TrainConfig, ckpt_args: dict, path: str = "the checkpoint") -> TrainConfig:
    """The checkpoint's settings, with what a new call may change taken from ``config``. Any other
    setting the call gives on purpose (``TrainConfig.given_fields``) must resolve to the run's own
    value: otherwise one error names each such flag with both values (nothing is ignored silently)."""
    base = config_from_checkpoint_args(ckpt_args, path)
    run_precision = base.precision
    for k in RESUME_OVERRIDABLE:
        v = getattr(config, k)
        if v is not None:
            setattr(base, k, v)
    if config.precision not in (None, run_precision):  # a new precision comes with its own recipe (or none)
        base.fp8_recipe = config.fp8_recipe
    for k in RESUME_FROM_CALL:
        setattr(base, k, getattr(config, k))
    _check_unchanged(config, base, path)
    return base


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _check_unchanged(config: TrainConfig, base: TrainConfig, path: str):
    """``--resume`` keeps the run's settings: a flag outside the ones that may change must give the
    run's value (compared after defaults are filled in, so ``--encoder digits-cnn`` on latent data
    equals the ``dinov2-vit-b`` it became)."""
    fixed = [k for k in config.given_fields() if k not in RESUME_OVERRIDABLE + RESUME_FROM_CALL]
    if not fixed:
        return
    asked = dataclasses.replace(base, **{k: getattr(config, k) for k in fixed})
    try:
        mine, theirs = resolve_config(asked), resolve_config(base)
    except ValueError:
        mine, theirs = asked, base
    diffs = [k for k in fixed if not _same(getattr(mine, k), getattr(theirs, k))]
    if not diffs:
        return
    listed = ", ".join(f"--{k.replace('_', '-')} {_show(getattr(config, k))} (the run has "
                       f"{_show(getattr(theirs, k))})" for k in diffs)
    hint = (" --warmup-from only starts a new run (another --out)." if "warmup_from" in diffs else "")
    raise ValueError(f"--resume {path} continues the run with its own settings, and {len(diffs)} flag(s) given here "
                     f"differ from them: {listed}. Leave them out (or give the run's values), or start a new run "
                     f"in another --out.{hint} Flags that may change on --resume: see docs/training.md")


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class WarmupSource:
    """A finished warmup to start full training from (``--warmup-from``): one of our runs'
    end-of-warmup checkpoints, or ERW's released warmup checkpoint."""
    path: str
    state_dict: dict
    steps: int
    depth: int
    rope: object            # True / False / None (unknown)
    warmup_cost: object     # ours: the warmup_cost record; ERW's: None
    model_config: object
    class_names: object = None   # the warmup run's class names (None: unknown)
    encoder: object = None       # the warmup run's target encoder(s) (None: unknown)
    data: object = None          # the warmup run's --data (None: unknown)


def read_warmup_source(path: str) -> WarmupSource:
    from ..method.transfer import warmup_depth
    from ..models.checkpoint import _args_dict, is_warmup_state_dict, select_state_dict

    ckpt = read_checkpoint(path)
    sd = select_state_dict(ckpt, "model")
    ours = isinstance(ckpt, dict) and "phase" in ckpt
    if (ours and ckpt["phase"] != "warmup") or (not ours and not is_warmup_state_dict(sd)):
        step = ckpt.get("steps", "?") if isinstance(ckpt, dict) else "?"
        raise ValueError(f"--warmup-from {path} is a full-training checkpoint (step {step}), not a warmup: continue "
                         f"it with --resume {path}, or give a warmup checkpoint (a run's RUN/checkpoints/<warmup "
                         "steps>.pt, or ERW's released 0100000.pt)")
    args = _args_dict(ckpt.get("args")) if isinstance(ckpt, dict) else {}
    if ours and int(ckpt["phase_step"]) < int(args.get("warmup_steps") or 0):
        raise ValueError(f"--warmup-from {path} is from the middle of a warmup (step {ckpt['phase_step']} of "
                         f"{args['warmup_steps']}): finish it with --resume {path}, or give the end-of-warmup "
                         "checkpoint")
    rope = args.get("rope", args.get("use_rope"))
    if rope is None and any(k.startswith("feat_rope.") for k in sd):
        rope = True
    steps = int(ckpt.get("steps", 0)) if isinstance(ckpt, dict) else 0
    return WarmupSource(path, {k: v for k, v in sd.items() if not k.startswith("feat_rope.")}, steps,
                        warmup_depth(sd), None if rope is None else bool(rope), ckpt.get("warmup_cost"),
                        args.get("model_config"), args.get("class_names"), args.get("encoder"), args.get("data"))

"""``train(TrainConfig) -> TrainResult``: a whole run — check everything, make the run folder, run
the method's phases (ERW: warmup → transfer → full training; REPA / vanilla: full training only),
checkpoint, sample, summarise. One process or many (torchrun: DDP, NCCL on GPU, gloo on CPU).

Every random draw that shapes a step is a function of (seed, step, global sample index)
(``erw_fast.utils.seeding``), so a run is reproducible whatever the number of processes, and a
resumed run repeats the losses of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..method.recipes import PHASE_TRAIN, PHASE_WARMUP, MethodSpec, describe_recipe, get_method
from ..method.transfer import TransferPlan, apply_transfer, plan_transfer, transfer_warmup
from ..models.checkpoint import list_checkpoints
from ..models.sit import SiT
from ..utils.distributed import Dist, barrier, setup_distributed
from ..utils.progress import RunProgress
from ..utils.runlock import RunLock
from ..utils.seeding import BatchIndexer
from .build import build_net, feature_extraction, fused_setting, load_encoders, uses_bf16
from .checkpoint import (read_warmup_source, clear_failed_start, set_aside_newer_checkpoints, folder_holds_checkpoints, open_resume_checkpoint, remove_stale_temp_files,
                         resume_config, truncate_metrics)
from .config import TrainConfig, check_environment, resolve_config
from .fsdp import plain_state_dict
from .errors import NonFiniteLossError, PeerLostError, RunFolderError, StepMemoryError  # noqa: F401  (re-exported)
from .logging import MetricsLog, summary_lines
from .phase import run_phase
from .signals import StopSignals


@dataclass
class TrainResult:
    out: str
    status: str                       # finished | interrupted | stopped
    steps: int                        # total steps done (warmup + full)
    checkpoint: Optional[str] = None
    samples_png: Optional[str] = None
    summary: dict = field(default_factory=dict)
    signal: Optional[int] = None      # the signal that interrupted the run


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint, restored on resume."""
    phase: str
    phase_step: int = 0
    transfer: Optional[dict] = None
    warmup_cost: Optional[dict] = None
    phase_seconds: float = 0.0
    resumed_from: Optional[str] = None  # the checkpoint this process resumed from (not saved)


@dataclass
class Run:
    """What every phase of one run shares (built once by ``train``)."""
    cfg: TrainConfig
    method: MethodSpec
    dist: Dist
    data: object
    encoders: List
    fused_align: object
    amp: bool
    log: MetricsLog
    bar: RunProgress
    signals: StopSignals
    indexer: BatchIndexer
    state: RunState
    result: TrainResult


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see ``TrainConfig``."""
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        if config.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {config.threads}")
        torch.set_num_threads(config.threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads_before)


def _open_run(config: TrainConfig, d: Dist):
    """(resolved config, checkpoint or None, its path, the --warmup-from source or None): resume or a
    fresh folder, everything checked before anything is written."""
    if config.resume:
        path, ckpt = open_resume_checkpoint(config)
        cfg = resolve_config(resume_config(config, ckpt["args"], path))
        _check_resume_position(cfg, ckpt, path)
    else:
        config, warm = _with_warmup_source(config)
        cfg, ckpt, path = resolve_config(config), None, None
        if folder_holds_checkpoints(cfg.out):
            raise RunFolderError(f"output folder {cfg.out!r} already holds a run; pass --resume to continue it or "
                                 "choose another --out")
    check_environment(cfg, d.device)
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    if (cfg.batch_size // d.world) % cfg.grad_accum:
        raise ValueError(f"--grad-accum {cfg.grad_accum} does not divide the per-process batch "
                         f"{cfg.batch_size // d.world} (--batch-size {cfg.batch_size} over {d.world} processes)")
    return cfg, ckpt, path, (warm if not config.resume else None)


def _finished(cfg: TrainConfig, ckpt: Optional[dict]) -> bool:
    """Whether the checkpoint is the end of the run these settings describe (nothing left to train)."""
    if ckpt is None:
        return False
    k = int(ckpt["phase_step"])
    if ckpt["phase"] == PHASE_TRAIN:
        return k >= cfg.steps
    return cfg.steps == 0 and k >= cfg.warmup_steps  # a warmup-only run


def _check_resume_position(cfg: TrainConfig, ckpt: dict, path: str):
    """``--steps`` below where the run already is: one error (a finished run is handled in ``_train``)."""
    k = int(ckpt["phase_step"])
    if ckpt["phase"] == PHASE_TRAIN and k > cfg.steps:
        raise ValueError(f"--steps {cfg.steps}: the run in {cfg.out} is already at full-training step {k} ({path}); "
                         f"--steps is the total number of full-training steps, so give at least {k} (more to "
                         "continue training)")


def _with_warmup_source(config: TrainConfig):
    """``--warmup-from``: the reused warmup sets the warmup region and the step numbering."""
    if not config.warmup_from:
        return config, None
    if not get_method(config.method).warmup:
        raise ValueError(f"--warmup-from needs --method erw (got --method {config.method})")
    if config.warmup_steps is not None:
        raise ValueError("--warmup-from reuses a finished warmup: leave out --warmup-steps")
    warm = read_warmup_source(config.warmup_from)
    if config.l2r_depth is not None and config.l2r_depth != warm.depth:
        raise ValueError(f"--l2r-depth {config.l2r_depth}, but the warmup in {warm.path} trained {warm.depth} blocks: "
                         f"use --l2r-depth {warm.depth} or leave it out")
    return dataclasses.replace(config, l2r_depth=warm.depth, warmup_steps=warm.steps), warm


def _make_folder(cfg: TrainConfig, d: Dist, ckpt: Optional[dict], bar: RunProgress):
    barrier(d.world)  # every rank has checked the folder before rank 0 writes into it
    if d.main:
        if ckpt is None and clear_failed_start(cfg.out):
            bar.message(f"note: {cfg.out} holds no checkpoint (an earlier start that never reached one): reusing it")
        if remove_stale_temp_files(cfg.out):
            bar.message(f"note: removed unfinished checkpoint writes (*.pt.tmp*) in {cfg.out}/checkpoints")
        if ckpt is not None:
            bad = truncate_metrics(cfg.out, int(ckpt["steps"]))
            if bad:
                bar.message(f"note: {os.path.join(cfg.out, 'metrics.jsonl')}: dropped {len(bad)} line(s) that are not "
                            f"log records (not a JSON object, or a step that is not an integer), line(s) "
                            f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}")
            moved = set_aside_newer_checkpoints(cfg.out, int(ckpt["steps"]))
            if moved:
                bar.message(f"note: resuming from step {ckpt['steps']}: the {len(moved)} newer checkpoint(s) moved to "
                            f"{os.path.join(cfg.out, 'checkpoints', 'abandoned')}")
        os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    barrier(d.world)


def _precision_label(cfg: TrainConfig, amp: bool, device) -> str:
    if cfg.precision == "fp8":
        return f"fp8 ({cfg.fp8_recipe}{', emulated' if device.type == 'cpu' else ''})"
    return "bf16" if amp else "fp32"


def _banner(run: Run) -> str:
    cfg, method, amp = run.cfg, run.method, run.amp
    sched = "none"
    if method.align:
        sched = f"{cfg.lambda_schedule} λ0={cfg.lambda0}"
        if cfg.lambda_schedule == "halflife":
            sched += f" half-life {cfg.half_life:g}"
    warm = f"warmup {cfg.warmup_steps} (L={cfg.l2r_depth}) + " if method.warmup else ""
    if cfg.warmup_from:
        warm = f"warmup reused from {cfg.warmup_from} ({cfg.warmup_steps} steps, L={cfg.l2r_depth}) + "
    return (f"erw_fast.train: {cfg.method} ({describe_recipe(cfg.method)} recipe) | {cfg.model} on {cfg.data} | encoder "
            f"{cfg.encoder if method.needs_encoder else '-'} | {warm}{cfg.steps} steps | batch {cfg.batch_size} "
            f"x {run.dist.world} proc | lr {cfg.lr:g} | λ {sched} @ block {cfg.encoder_depth - 1} | EMA {cfg.ema_decay} "
            f"| rope {cfg.rope} qk-norm {cfg.qk_norm} | {run.dist.device.type} {_precision_label(cfg, amp, run.dist.device)}"
            f"{' compiled' if cfg.compile else ''}{' fsdp' if cfg.fsdp and run.dist.world > 1 else ''} | out {cfg.out}")


def _train(config: TrainConfig) -> TrainResult:
    d = setup_distributed(config.device)
    lock = RunLock(config.out, "train") if d.main else None  # one writer per run folder (rank 0 writes)
    try:
        if lock is not None:
            lock.acquire(create=False)  # an existing folder: locked before it is read
        return _train_locked(config, d, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: TrainConfig, d: Dist, lock) -> TrainResult:
    cfg, ckpt, ckpt_path, warm = _open_run(config, d)
    if _finished(cfg, ckpt):
        if d.main:
            print(f"{cfg.out} is finished: {ckpt_path} is its last step ({int(ckpt['steps'])}); nothing to do, "
                  "nothing written. To train further: --resume --steps N with N above "
                  f"{int(ckpt['phase_step']) if ckpt['phase'] == PHASE_TRAIN else 0}", file=sys.stderr)
        return TrainResult(out=cfg.out, status="finished", steps=int(ckpt["steps"]), checkpoint=ckpt_path)
    method = get_method(cfg.method)
    from ..data import class_names_of, load_train_data

    # everything that can be checked is checked before anything is written
    data = load_train_data(cfg.data, d.device, resolution=cfg.resolution, hflip=cfg.hflip)
    cfg.class_names = class_names_of(data, cfg.class_names)  # recorded in config.json and the checkpoints
    encoders = load_encoders(cfg, data, d.device)
    full = _fitting_model(cfg, data, encoders, warm) if warm is not None else None
    if ckpt is not None:
        _check_resume_weights(cfg, data, encoders, ckpt, ckpt_path)
    bar = RunProgress(enabled=d.main, bar=cfg.progress)
    fresh = not os.path.exists(cfg.out)
    if lock is not None:
        lock.acquire()  # a new folder is made (and locked) only now, once everything is checked
    _make_folder(cfg, d, ckpt, bar)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = MetricsLog(cfg.out, enabled=d.main, notify=bar.message)
    first = PHASE_WARMUP if (method.warmup and cfg.warmup_steps > 0 and warm is None) else PHASE_TRAIN
    state = RunState(first)
    if ckpt is not None:
        state = RunState(ckpt["phase"], int(ckpt["phase_step"]), ckpt.get("transfer"), ckpt.get("warmup_cost"),
                         float(ckpt.get("phase_seconds", 0.0)), resumed_from=ckpt_path)
    run = Run(cfg, method, d, data, encoders, fused_setting(cfg, d.device), uses_bf16(cfg, d.device), log, bar,
              StopSignals(notify=bar.message), BatchIndexer(data.num_samples, cfg.batch_size, cfg.seed, d.rank, d.world),
              state,
              TrainResult(out=cfg.out, status="finished", steps=0))
    bar.message(_banner(run))
    for cost in feature_extraction(encoders):  # --features precomputed on the digits: the one-off extraction
        log.write({"event": "features", **cost})
        run.result.summary.setdefault("features_cost", []).append(cost)
    if cfg.fsdp and d.world == 1:
        bar.message("note: --fsdp with one process has nothing to shard; training unsharded")
    try:
        return _execute(run, ckpt, warm, full, fresh)
    finally:
        bar.close()
        log.close()


def _execute(run: Run, ckpt, warm, full, fresh: bool) -> TrainResult:
    """The phases, the summary; a step out of memory, or a lost torchrun peer, is one error line (a start
    that wrote no checkpoint leaves nothing behind)."""
    cfg, d, t0 = run.cfg, run.dist, time.time()
    try:
        with run.signals:
            status = _run_phases(run, ckpt, warm, full)
    except StepMemoryError:
        if d.main and not folder_holds_checkpoints(cfg.out):
            run.log.close()
            if fresh:
                shutil.rmtree(cfg.out, ignore_errors=True)  # this call made it: nothing half-made stays
            else:
                clear_failed_start(cfg.out)
        raise
    except RuntimeError as e:
        if d.world <= 1 or not _lost_peer(e):
            raise
        last = run.result.checkpoint or (list_checkpoints(cfg.out) or ["none"])[-1]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PeerLostError(f"rank {d.rank} of {d.world}: a collective failed ({type(e).__name__}: {first}): another "
                            "process of the run died or was killed (torchrun's report names the rank that exited). "
                            f"Last checkpoint: {last}; continue with torchrun ... -m erw_fast.train --resume --out "
                            f"{cfg.out}") from None
    run.result.status = status
    if status == "finished" and d.main:
        run.result.summary["total_seconds"] = time.time() - t0
        run.bar.message(summary_lines(cfg, run.result, run.state))
    return run.result


_COLLECTIVE_FAILURE = ("gloo", "nccl", "connection", "peer", "socket", "broken pipe", "timed out", "closed")


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a failed collective (another rank gone), not a bug of this process."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(e, backend_error) or any(w in str(e).lower() for w in _COLLECTIVE_FAILURE)


def _check_resume_weights(cfg: TrainConfig, data, encoders, ckpt: dict, path: str):
    """Before anything is written: the checkpoint's weights must fit the model these settings build."""
    model = build_net(cfg, data, [e.dim for e in encoders], warm=ckpt["phase"] == PHASE_WARMUP)
    own = model.state_dict()
    theirs = ckpt["model"]
    bad = sorted(set(own) ^ set(theirs)) + [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if bad:
        k = bad[0]
        what = (f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}" if k in own and k in theirs
                else f"{k} {'missing from the checkpoint' if k in own else 'not in the model'}")
        raise ValueError(f"--resume {path}: its weights do not fit the model these settings build ({len(bad)} "
                         f"mismatches; first: {what})")


def warmup_plan(cfg: TrainConfig, data, encoders, warm) -> Tuple[SiT, TransferPlan]:
    """This run's full model and the plan of transferring the reused warmup into it (nothing written)."""
    model = build_net(cfg, data, [e.dim for e in encoders], warm=False)
    encoder = cfg.encoder if get_method(cfg.method).needs_encoder else None
    plan = plan_transfer(warm.state_dict, model, warm_classes=warm.class_names, classes=cfg.class_names,
                         warm_config=warm.model_config, warm_encoder=warm.encoder, encoder=encoder,
                         reuse_labels=cfg.reuse_labels, same_data=warm.data is not None and warm.data == cfg.data)
    return model, plan


def transfer_plan(config: TrainConfig) -> Tuple[TransferPlan, TrainConfig]:
    """(the plan, the resolved settings) of ``config``'s ``--warmup-from`` transfer, as a run with these
    settings would make it; nothing is trained or written (``python -m erw_fast.train --plan-transfer``)."""
    if not config.warmup_from:
        raise ValueError("--plan-transfer shows how --warmup-from CKPT transfers: give --warmup-from")
    from ..data import class_names_of, load_train_data
    from ..utils.distributed import pick_device

    config, warm = _with_warmup_source(config)
    cfg = resolve_config(config)
    device = pick_device(cfg.device)
    data = load_train_data(cfg.data, device, resolution=cfg.resolution, hflip=cfg.hflip)
    cfg.class_names = class_names_of(data)
    return warmup_plan(cfg, data, load_encoders(cfg, data, device), warm)[1], cfg


def _fitting_model(cfg: TrainConfig, data, encoders, warm) -> Tuple[SiT, TransferPlan]:
    """The full model of a ``--warmup-from`` run and its transfer plan, checked before anything is
    written: what must match and does not is refused in one line naming both values and the flag."""
    model, plan = warmup_plan(cfg, data, encoders, warm)
    if plan.refusals:
        raise ValueError(f"--warmup-from {warm.path} does not fit this run: " + "; ".join(plan.refusals))
    return model, plan


def _run_phases(run: Run, ckpt: Optional[dict], warm=None, full: Optional[Tuple[SiT, TransferPlan]] = None) -> str:
    cfg, state = run.cfg, run.state
    z_dims = [e.dim for e in run.encoders]
    warm_model = None
    if state.phase == PHASE_WARMUP:
        warm_model = build_net(cfg, run.data, z_dims, warm=True)
        status = run_phase(run, PHASE_WARMUP, warm_model, ckpt)
        ckpt = None
        if status != "finished" or cfg.steps == 0:  # --steps 0: a warmup-only run ends with its checkpoint
            return status
        state.phase, state.phase_step, state.phase_seconds = PHASE_TRAIN, 0, 0.0
    model = full[0] if full is not None else build_net(cfg, run.data, z_dims, warm=False)
    if ckpt is None and warm_model is not None:
        _transfer(run, plain_state_dict(warm_model), model, warm_model.config())
        del warm_model
    elif ckpt is None and warm is not None:
        _reuse(run, warm, model, full[1])
    return run_phase(run, PHASE_TRAIN, model, ckpt)


def _reuse(run: Run, warm, model: SiT, plan: TransferPlan):
    """Transfer from a reused warmup; its cost is recorded as reused, not charged to this run."""
    if warm.rope is not None and warm.rope != run.cfg.rope:
        run.bar.message(f"note: the warmup in {warm.path} was trained {'with' if warm.rope else 'without'} RoPE; "
                        f"transferring into a model {'with' if run.cfg.rope else 'without'} it (as ERW's code does)")
    cost = warm.warmup_cost or {}
    reused = dict(source=warm.path, steps=warm.steps, flops_total=cost.get("flops_total"),
                  seconds=cost.get("seconds"), charged=False)
    _transfer(run, warm.state_dict, model, warm.model_config, reused=reused, plan=plan)
    run.log.write({"event": "warmup_reused", **reused})


def _transfer(run: Run, warm_state: dict, model: SiT, warm_config, reused: Optional[dict] = None,
              plan: Optional[TransferPlan] = None):
    """The warmup's weights into the full model: all of them (this run's own warmup), or what
    ``plan`` carries (a reused warmup); recorded as the ``transfer`` event and in the checkpoints."""
    cfg = run.cfg
    keys = transfer_warmup(warm_state, model) if plan is None else apply_transfer(plan, warm_state, model)
    run.state.transfer = dict(from_step=cfg.warmup_steps, num_keys=len(keys), keys=keys, l2r_depth=cfg.l2r_depth,
                              warm_model_config=warm_config, full_model_config=model.config())
    if plan is not None:
        run.state.transfer.update(plan.record())
    if reused:
        run.state.transfer["reused_warmup"] = reused
    run.log.write({"event": "transfer", **run.state.transfer})
    note = plan.note() if plan is not None else None
    what = "what fits; the note names the rest" if note else \
        f"embedders, pos_embed, blocks 0..{cfg.l2r_depth - 1}, projectors"
    run.bar.message(f"transfer: copied {len(keys)} tensors ({what}) from warmup step {cfg.warmup_steps}; fresh "
                    "optimizer, EMA reset")
    if note:
        run.bar.message(f"note: {note}")

"""``run_phase``: one phase of a run (ERW's warmup, or full training) from its current step to its
end — the step loop around ``Trainer.train_step`` with logging, checkpoints, stop signals, the NaN
stop and sample grids. Host-device syncs happen only at log / checkpoint / stop points (and at the
optional sample-grid, online-evaluation and probe steps)."""
from __future__ import annotations

import os
import time

import torch

from ..method.recipes import PHASE_WARMUP
from ..utils.distributed import any_rank, barrier, max_over_ranks, mean_over_ranks
from .batches import BatchSource
from .build import phase_trainer
from ..models.checkpoint import list_checkpoints
from .checkpoint import FORMAT, checkpoint_path, save_atomic
from .errors import NonFiniteLossError, StepMemoryError
from .logging import fmt_seconds, human_flops
from .samples import sample_and_save
from .signals import StopRequested
from .trainer import Trainer


def build_trainer(run, phase: str, model, ckpt):
    """(Trainer, BatchSource, FLOPs of one step) for ``phase``, restored from ``ckpt`` when given."""
    cfg, d = run.cfg, run.dist
    warm = phase == PHASE_WARMUP
    offset = 0 if warm else cfg.warmup_steps
    n_steps = cfg.warmup_steps if warm else cfg.steps
    k = run.state.phase_step
    trainer = phase_trainer(cfg, phase, model, run.encoders, d.device, run.fused_align, run.amp, first_step=offset + k)
    trainer.inject_nan_at = cfg.debug_nan_at_step
    if ckpt is not None:
        _restore(run, trainer, ckpt)
    batches = BatchSource(run.data, run.encoders, trainer.objective, run.indexer, cfg.seed, cfg.class_dropout, offset,
                          d.device, prefetch=cfg.prefetch)
    flops = _count_flops(trainer, batches, k, n_steps, d.world)
    trainer.wrap(compile=cfg.compile, world=d.world, fsdp=cfg.fsdp)
    if trainer.fp8:
        run.log.write({"event": "fp8", "phase": phase, "recipe": trainer.fp8, "float8_linears": trainer.fp8_linears})
    return trainer, batches, flops


class StepFlops:
    """FLOPs of one step (forward + backward + target encoder): ``aligned`` until phase step
    ``stop_at`` (the alignment stop, if any), ``unaligned`` from then on."""

    def __init__(self, aligned, unaligned=None, stop_at=None):
        self.aligned, self.unaligned, self.stop_at = aligned, unaligned, stop_at

    def at(self, k: int):
        return self.unaligned if (self.stop_at is not None and k >= self.stop_at) else self.aligned

    def total(self, n: int):
        if self.stop_at is None:
            return None if self.aligned is None else self.aligned * n
        on, off = min(self.stop_at, n), max(n - self.stop_at, 0)
        if (on and self.aligned is None) or (off and self.unaligned is None):
            return None
        return (self.aligned or 0) * on + (self.unaligned or 0) * off


def _count_flops(trainer, batches, k, n_steps, world) -> StepFlops:
    """Counted on the eager objective before DDP; best effort (None if the counter fails). With an
    alignment stop both kinds of step are counted, whatever step the phase (re)starts at."""
    schedule = trainer.objective.schedule if trainer.objective.may_stop_aligning else None
    stop = schedule.first_inactive(n_steps) if schedule is not None else None
    try:
        on = trainer.count_step_flops(batches.get(0), 0) * world if stop != 0 else None
        off = trainer.count_step_flops(batches.get(stop), stop) * world if stop is not None else None
    except Exception:  # pragma: no cover
        return StepFlops(None)
    return StepFlops(on, off, stop)


def _restore(run, trainer: Trainer, ckpt: dict):
    """Load a checkpoint's weights and state; only then is the resume logged."""
    path = run.state.resumed_from
    try:
        trainer.load_state(ckpt)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--resume {path}: its weights do not fit the model these settings build ({first})") from None
    if "rng" in ckpt and "torch" in ckpt["rng"]:
        torch.set_rng_state(ckpt["rng"]["torch"])
    run.bar.message(f"resuming {run.cfg.out} from {path}: {run.state.phase} step {run.state.phase_step}")
    before = ckpt.get("num_threads")
    if run.dist.device.type == "cpu" and before is not None and int(before) != torch.get_num_threads():
        run.bar.message(f"note: this run trained on {before} CPU thread(s) so far and goes on with "
                        f"{torch.get_num_threads()}: float sums change order, so from here it matches an uninterrupted "
                        f"run to float rounding (~1e-6), not bit for bit; --threads {before} keeps it exact")
    run.log.write({"event": "resume", "from": path, "steps": int(ckpt["steps"])})


def _save(run, trainer: Trainer, phase: str, step: int, k: int, seconds: float):
    weights = trainer.state() if (trainer.fsdp or run.dist.main) else None  # FSDP: a collective gather
    if run.dist.main:
        args = run.cfg.to_dict()
        args["model_config"] = trainer.model.config()
        args["num_classes"] = run.data.num_classes
        path = checkpoint_path(run.cfg.out, step)
        st = run.state
        save_atomic({**weights, "args": args, "steps": step, "phase": phase, "phase_step": k,
                     "transfer": st.transfer, "warmup_cost": st.warmup_cost, "phase_seconds": seconds,
                     "rng": {"torch": torch.get_rng_state()}, "num_threads": torch.get_num_threads(),
                     "format": FORMAT}, path)
        run.log.write({"event": "checkpoint", "path": path, "steps": step, "phase": phase})
        run.result.checkpoint = path
        _prune(run)
    barrier(run.dist.world)


def _samples(run, trainer: Trainer, step: int):
    from ..models.sit import SiT

    model = trainer.sampling_model(lambda: SiT(**trainer.model.config()))  # FSDP: a collective gather
    sample_and_save(run.cfg, model, run.data, run.dist.device, step, run.amp, run.dist.main, run.log, run.result,
                    run.dist.world, stop=run.signals.stoppable(run.dist.world))


def _evaluate(run, trainer: Trainer, step: int, window: dict):
    """Online FID; its wall time is kept out of the phase's training time (and the img/s window)."""
    from ..models.sit import SiT
    from .online_eval import evaluate_online

    t0 = time.time()
    model = trainer.sampling_model(lambda: SiT(**trainer.model.config()))
    evaluate_online(run, model, step, share=not trainer.fsdp)
    spent = time.time() - t0
    window["eval_s"] += spent
    window["t0"] += spent


def _prune(run):
    """``--keep-last N``: delete periodic checkpoints but the N newest; the end-of-warmup checkpoint
    and the ``--ckpt-at`` ones are kept."""
    cfg = run.cfg
    if not cfg.keep_last:
        return
    keep = set(cfg.ckpt_at) | ({cfg.warmup_steps} if run.method.warmup and cfg.warmup_steps else set())
    periodic = [p for p in list_checkpoints(cfg.out) if int(os.path.basename(p)[:-3]) not in keep]
    for p in periodic[:-cfg.keep_last]:
        os.remove(p)
        run.log.write({"event": "checkpoint_removed", "path": p})


def _check_finite(run, trainer: Trainer, phase: str):
    d = run.dist
    bad = max_over_ranks(int(trainer.bad_step.item()), d.world, d.device) + 1  # the log's step numbering
    if bad >= 1:
        msg = (f"non-finite loss (NaN/inf) at step {bad} ({phase}); stopping. The last good checkpoint "
               f"is {run.result.checkpoint or 'none (no checkpoint was written yet)'}; lower --lr or check "
               "the data")
        run.log.write({"event": "nonfinite", "step": bad, "phase": phase})
        run.bar.message(msg)
        raise NonFiniteLossError(msg)


def _log(run, phase: str, out, step: int, k: int, n_steps: int, window: dict, elapsed: float, flops) -> dict:
    """A log row; under torchrun the losses are the mean over all ranks (every rank calls this at the
    same steps), so the log does not depend on the number of processes."""
    lv, av, vv = mean_over_ranks([out.loss.item(), out.align.item(), out.vel.item()], run.dist.world,
                                 run.dist.device)
    dt = max(time.time() - window["t0"], 1e-9)
    rate = window["imgs"] / dt
    rec = dict(phase=phase, step=step, phase_step=k, loss=lv, loss_align=av, loss_velocity=vv,
               **{"lambda": out.lam}, grad_norm=float(out.grad_norm), img_per_s=rate, lr=run.cfg.lr, time=elapsed)
    if flops.stop_at is not None:  # with an alignment stop, the step's cost changes: log it
        rec["flops_per_step"] = flops.at(k - 1)
    if run.cfg.precision == "fp8":  # float8 linears: the FLOPs counted are the same, the step is not bf16
        rec["fp8"] = run.cfg.fp8_recipe
    run.log.write(rec)
    warm = phase == PHASE_WARMUP
    fields = {"loss": lv}
    if run.method.align or warm:
        fields["align"] = av
    if not warm:
        fields["vel"] = vv
        if run.method.align:
            fields["λ"] = out.lam
    fields["img/s"] = round(rate, 1)
    run.bar.update(phase, k, n_steps, fields, final=k == n_steps)
    window.update(t0=time.time(), imgs=0)
    return rec


def _time_for_checkpoint(run, last_save: float, sync_point: bool) -> bool:
    """``--ckpt-every-minutes``: due when that long passed since the last checkpoint (agreed by every
    rank, at log steps, when there are several)."""
    minutes, d = run.cfg.ckpt_every_minutes, run.dist
    if not minutes:
        return False
    due = time.time() - last_save >= 60.0 * minutes
    if d.world > 1:
        return any_rank(due, d.world, d.device) if sync_point else False
    return due


def _stop_requested(run, step: int, sync_point: bool) -> bool:
    """A stop signal (agreed by every rank, at sync points only when there are several) or --stop-after."""
    cfg, d = run.cfg, run.dist
    signalled = run.signals.signum is not None
    if d.world > 1:
        signalled = any_rank(signalled, d.world, d.device) if sync_point else False
    return signalled or (cfg.stop_after is not None and step >= cfg.stop_after)


def run_phase(run, phase: str, model, ckpt) -> str:
    """Run ``phase`` from ``run.state.phase_step``; returns finished | interrupted | stopped."""
    cfg, st = run.cfg, run.state
    warm = phase == PHASE_WARMUP
    n_steps = cfg.warmup_steps if warm else cfg.steps
    offset = 0 if warm else cfg.warmup_steps
    trainer, batches, flops = build_trainer(run, phase, model, ckpt)
    probe = None
    if cfg.align_probe_every and run.dist.main and run.encoders:
        from .align_probe import AlignProbe

        probe = AlignProbe(run, warm)
    k, t_start = st.phase_step, time.time()
    window, last, status = dict(t0=time.time(), imgs=0, saved=time.time(), eval_s=0.0), {}, "finished"
    seconds = lambda: st.phase_seconds + (time.time() - t_start) - window["eval_s"]  # noqa: E731
    while k < n_steps:
        out = _train_step(run, trainer, batches, k, offset, phase)
        k += 1
        step = offset + k
        window["imgs"] += cfg.batch_size
        do_log = k % cfg.log_every == 0 or k == n_steps
        do_ckpt = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or (warm and k == n_steps) or step in cfg.ckpt_at
        do_ckpt = do_ckpt or _time_for_checkpoint(run, window["saved"], do_log)
        stop_now = _stop_requested(run, step, do_log or do_ckpt)
        if do_log or do_ckpt or stop_now:
            _check_finite(run, trainer, phase)
        if do_log:
            last = _log(run, phase, out, step, k, n_steps, window, seconds(), flops)
        try:
            if cfg.sample_every and not warm and step % cfg.sample_every == 0 and k < n_steps:
                _samples(run, trainer, step)
            if cfg.eval_every and not warm and step % cfg.eval_every == 0:
                _evaluate(run, trainer, step, window)
        except StopRequested:  # a signal during a grid or an evaluation: stop with a checkpoint now
            stop_now = True
        if probe is not None and step % cfg.align_probe_every == 0:
            probe(run, trainer.model, step, phase)
        if warm and k == n_steps:  # recorded before the end-of-warmup checkpoint, which carries it
            _record_warmup_cost(run, trainer, seconds(), flops)
        if do_ckpt:
            _save(run, trainer, phase, step, k, seconds())
            window["saved"] = time.time()
        if stop_now:
            status = _stop(run, trainer, phase, step, k, seconds(), saved=bool(do_ckpt))
            break
    batches.close()
    run.result.steps = offset + k
    try:
        _end_phase(run, trainer, phase, status, k, seconds(), flops, last)
    except StopRequested as e:  # during the final grid: the final checkpoint is written already
        run.bar.message(f"stopped during the final sample grid (signal {e.signum}); training is complete and its "
                        f"checkpoint {run.result.checkpoint} is written, the grid is not (python -m erw_fast.sample "
                        f"--ckpt {cfg.out} --out {os.path.join(cfg.out, 'final.npz')} makes one)")
        run.result.signal, status = e.signum, "interrupted"
    return status


def _train_step(run, trainer, batches, k: int, offset: int, phase: str):
    """One step; running out of memory is one error naming the batch and what lowers the memory."""
    try:
        return trainer.train_step(batches.get(k), k, global_step=offset + k)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        cfg, world = run.cfg, run.dist.world
        per = cfg.batch_size // world
        micro = f", micro-batch {per // cfg.grad_accum} with --grad-accum {cfg.grad_accum}" if cfg.grad_accum > 1 else ""
        raise StepMemoryError(
            f"out of memory at step {offset + k + 1} ({phase}) with --batch-size {cfg.batch_size} ({per} per process"
            f"{micro}) on {run.dist.device}: lower --batch-size, or keep it and split each step with --grad-accum N "
            "(the same step in N micro-batches, less memory), or add --grad-checkpoint") from None


def is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", ())
    msg = str(e)
    return isinstance(e, oom) or "out of memory" in msg or "can't allocate memory" in msg


def _stop(run, trainer, phase, step, k, seconds, saved: bool) -> str:
    cfg, signum = run.cfg, run.signals.signum
    why = f"signal {signum}" if signum is not None else f"--stop-after {cfg.stop_after}"
    if not saved:
        _save(run, trainer, phase, step, k, seconds)
    run.bar.message(f"stopped at step {step} ({why}); checkpoint {run.result.checkpoint}. "
                    f"Continue with --resume --out {cfg.out}")
    run.result.signal = signum
    return "interrupted" if signum is not None else "stopped"


def _record_warmup_cost(run, trainer, seconds, flops):
    cfg, W = run.cfg, run.cfg.warmup_steps
    per_step = flops.aligned
    run.state.warmup_cost = dict(steps=W, seconds=seconds, flops_per_step=per_step, flops_total=(per_step or 0) * W,
                                 trained_params=sum(p.numel() for p in trainer.params), batch_size=cfg.batch_size)
    run.log.write({"event": "warmup_cost", **run.state.warmup_cost})
    run.bar.message(f"warmup: {W} steps in {fmt_seconds(seconds)}, {human_flops((per_step or 0) * W)} "
                    f"({human_flops(per_step or 0)}/step)")


def _end_phase(run, trainer, phase, status, k, seconds, flops, last):
    cfg, st = run.cfg, run.state
    if status != "finished":
        return
    if phase == PHASE_WARMUP:
        if st.warmup_cost is None:
            _record_warmup_cost(run, trainer, seconds, flops)
        run.result.summary["warmup_last"] = last
        return
    step = cfg.warmup_steps + k
    if not ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step in cfg.ckpt_at):
        _save(run, trainer, phase, step, k, seconds)
    _samples(run, trainer, step)
    run.result.summary.update(train_seconds=seconds, train_flops_per_step=flops.aligned,
                              train_flops_total=flops.total(cfg.steps), last=last,
                              warmup_cost=st.warmup_cost, transfer_keys=(st.transfer or {}).get("num_keys"))

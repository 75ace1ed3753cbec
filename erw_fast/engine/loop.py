"""The training loop: ERW's warmup phase, the transfer, and full training (REPA/vanilla: full only).

``train(TrainConfig) -> TrainResult``. One process or many (torchrun: DDP, NCCL on GPU, gloo on
CPU). Every random draw that shapes a step is a function of (seed, step, global sample index), so a
run is reproducible whatever the number of processes, and a resumed run repeats the losses of an
uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..erw import AlignmentSchedule, alignment_from_hidden, get_method, transfer_warmup
from ..models.sit import SiT, build_model
from ..transport import interpolate, velocity_loss
from .config import RESUME_FROM_CALL, RESUME_OVERRIDABLE, TrainConfig, resolve_config
from .utils import (EMA, STREAM_INIT, STREAM_TRAIN, STREAM_WARMUP, BatchIndexer, MetricsLog, Prefetcher,
                    Progress, all_true, fmt_seconds, human_flops, list_checkpoints, mix_seed, read_training_checkpoint,
                    map_tensors, sample_draws, save_atomic, setup_distributed)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN/inf; the last good checkpoint on disk is left untouched."""


class RunFolderError(ValueError):
    """The output folder already holds another run (and --resume was not given)."""


@dataclass
class TrainResult:
    out: str
    status: str                       # finished | interrupted | stopped
    steps: int                        # total steps done (warmup + full)
    checkpoint: Optional[str] = None
    samples_png: Optional[str] = None
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class DataInfo:
    images: torch.Tensor
    labels: torch.Tensor
    input_size: int
    channels: int
    num_classes: int


def load_data(name: str, device):
    """``digits`` (a DataInfo, on ``device``), or a latent dataset folder (a ``LatentData``: shards from
    ``python -m erw_fast.preprocess`` or REPA's layout; read per batch, posterior re-sampled each step)."""
    if name != "digits":
        if not os.path.isdir(name):
            raise ValueError(f"unknown --data {name!r}: use 'digits' (the embedded dataset) or a latent dataset "
                             "folder made by `python -m erw_fast.preprocess`")
        from ..data.latents import LatentData

        return LatentData(name)
    from ..data.digits import NUM_CLASSES, load_digits

    x, y = load_digits(16)
    return DataInfo(x.to(device), y.to(device), 16, 1, NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# Model and objective
# --------------------------------------------------------------------------------------------
def build_net(cfg: TrainConfig, data: DataInfo, z_dims: List[int], warm: bool) -> SiT:
    """The full SiT, or ERW's warmup model (blocks 0..L-1 only), seeded per phase."""
    kw = dict(input_size=data.input_size, in_channels=data.channels, num_classes=data.num_classes,
              class_dropout_prob=cfg.class_dropout, encoder_depth=cfg.encoder_depth, z_dims=list(z_dims),
              projector_dim=cfg.projector_dim, use_rope=cfg.rope, qk_norm=cfg.qk_norm,
              attn_backend=cfg.attn_backend, fused=cfg.fused)
    if warm:
        kw.update(depth=cfg.l2r_depth, encoder_depth=cfg.l2r_depth)
    torch.manual_seed(mix_seed(cfg.seed, STREAM_INIT, int(warm)))
    model = build_model(cfg.model, **kw)
    if warm:  # the warmup model has no use for its final layer: keep it out of the optimizer/DDP
        model.final_layer.requires_grad_(False)
    return model


class Objective(nn.Module):
    """One step's loss as a module (so DDP can wrap it): ERW warmup or full training."""

    def __init__(self, model: SiT, warm_blocks: Optional[int], align: bool, kind: str, temperature: float,
                 fused_align):
        super().__init__()
        self.model = model
        self.warm_blocks = warm_blocks
        self.align = align
        self.kind = kind
        self.temperature = temperature
        self.fused_align = fused_align

    def forward(self, x, noise, t, y, drop, targets: List[torch.Tensor], lam: float):
        m = self.model
        if self.warm_blocks:
            # clean input (t = 0), alignment only
            h = m.forward_warmup(x, t, y, self.warm_blocks, force_drop_ids=drop, return_hidden=True)
            align = alignment_from_hidden(m, h, targets, self.kind, self.temperature, self.fused_align)
            return align, align.detach(), torch.zeros_like(align.detach())
        xt = interpolate(x, noise, t)
        out, h = m(xt, t, y, force_drop_ids=drop, return_hidden=True)
        vel = velocity_loss(out, x, noise)
        if not self.align:
            return vel, torch.zeros_like(vel.detach()), vel.detach()
        align = alignment_from_hidden(m, h, targets, self.kind, self.temperature, self.fused_align)
        return vel + lam * align, align.detach(), vel.detach()


def _fused_align_setting(cfg: TrainConfig, device):
    if cfg.fused is not None:
        return cfg.fused
    try:
        from .. import ops

        return "auto" if (device.type == "cuda" and ops.triton_available()) else False
    except Exception:
        return False


def make_optimizer(model: nn.Module, lr: float, device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if device.type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(params, **kw)


def count_flops(fn) -> float:
    """FLOPs of one call of ``fn`` (forward + backward) with torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# Run folder
# --------------------------------------------------------------------------------------------
def folder_holds_run(out: str) -> bool:
    return os.path.isdir(out) and (
        os.path.exists(os.path.join(out, "metrics.jsonl")) or bool(list_checkpoints(out))
        or os.path.exists(os.path.join(out, "config.json"))
    )


def _resume_config(config: TrainConfig, ckpt_args: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in ckpt_args.items() if k in names})
    for k in RESUME_OVERRIDABLE:
        v = getattr(config, k)
        if v is not None:
            setattr(base, k, v)
    for k in RESUME_FROM_CALL:
        setattr(base, k, getattr(config, k))
    return base


def find_resume_checkpoint(config: TrainConfig) -> str:
    if config.resume in ("auto", "latest", ""):
        ckpts = list_checkpoints(config.out)
        if not ckpts:
            raise FileNotFoundError(f"--resume: no checkpoint found under {os.path.join(config.out, 'checkpoints')}")
        return ckpts[-1]
    return config.resume


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see ``TrainConfig``."""
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads_before)


def _train(config: TrainConfig) -> TrainResult:
    rank, world, device = setup_distributed(config.device)
    main = rank == 0
    ckpt = None
    if config.resume:
        ckpt_path = find_resume_checkpoint(config)
        ckpt = read_training_checkpoint(ckpt_path)
        cfg = resolve_config(_resume_config(config, ckpt["args"]))
    else:
        cfg = resolve_config(config)
        if folder_holds_run(cfg.out):
            raise RunFolderError(
                f"output folder {cfg.out!r} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
    method = get_method(cfg.method)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    # everything that can be checked is checked before anything is written
    data = load_data(cfg.data, device)
    encoders = []
    if method.align:
        from ..encoders import build_encoders, check_token_grid

        if cfg.features == "precomputed":
            from ..extract_features import precomputed_encoders

            encoders = precomputed_encoders(cfg.data, cfg.encoder, expected_count=len(data.labels))
        else:
            from ..encoders import build_encoder

            # DINOv2 resizes its input so that its patch grid equals the SiT token grid
            patch = int(str(cfg.model).rsplit("/", 1)[-1])
            enc_kw = dict(input_size=data.input_size, token_grid=data.input_size // patch, patch_size=patch)
            if cfg.encoder_source != "auto":
                enc_kw["source"] = cfg.encoder_source
            names = [n.strip() for n in cfg.encoder.split(",") if n.strip()]
            paths = [q.strip() for q in cfg.encoder_path.split(",")] if cfg.encoder_path else []
            if paths and len(paths) != len(names):
                raise ValueError(f"--encoder-path lists {len(paths)} path(s) for {len(names)} encoder(s) "
                                 f"({cfg.encoder}); give one per encoder, comma-separated")
            encoders = [build_encoder(n, device=device, **enc_kw, **({"path": paths[i]} if paths and paths[i] else {}))
                        for i, n in enumerate(names)]
        patch = int(cfg.model.rsplit("/", 1)[1])
        check_token_grid(encoders, (data.input_size // patch) ** 2, f"model {cfg.model}")
    if world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if main:
        os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    if world > 1:
        dist.barrier()

    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    z_dims = [e.dim for e in encoders]
    fused_align = _fused_align_setting(cfg, device)
    log = MetricsLog(cfg.out, enabled=main)
    bar = Progress(enabled=main, bar=cfg.progress)
    indexer = BatchIndexer(len(data.labels), cfg.batch_size, cfg.seed, rank, world)
    schedule = AlignmentSchedule(cfg.lambda_schedule, cfg.lambda0, cfg.half_life, cfg.tau)
    W, P = cfg.warmup_steps, cfg.steps
    shape = (data.channels, data.input_size, data.input_size)

    # --- signals: finish the step, checkpoint, exit cleanly -------------------------------------
    stop_flag = {"signal": None}
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def _handler(signum, _frame):
            if stop_flag["signal"] is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            stop_flag["signal"] = signum
            if main:
                bar.message(f"signal {signal.Signals(signum).name}: finishing this step, then checkpoint and exit "
                            "(Ctrl-C again to abort)")

        for s in (signal.SIGTERM, signal.SIGINT):
            old_handlers[s] = signal.signal(s, _handler)

    state = dict(phase="warmup" if (method.warmup and W > 0) else "train", phase_step=0, transfer=None,
                 warmup_cost=None, phase_seconds=0.0)
    if ckpt is not None:
        state.update(phase=ckpt["phase"], phase_step=int(ckpt["phase_step"]), transfer=ckpt.get("transfer"),
                     warmup_cost=ckpt.get("warmup_cost"), phase_seconds=float(ckpt.get("phase_seconds", 0.0)))
        if main:
            bar.message(f"resuming {cfg.out} from {ckpt_path}: {state['phase']} step {state['phase_step']}")
            log.write({"event": "resume", "from": ckpt_path, "steps": int(ckpt["steps"])})

    if main:
        sched = (f"{cfg.lambda_schedule} λ0={cfg.lambda0}" + (f" half-life {cfg.half_life:g}" if cfg.lambda_schedule == "halflife" else "")
                 if method.align else "none")
        bar.message(
            f"erw_fast.train: {cfg.method} | {cfg.model} on {cfg.data} | encoder {cfg.encoder if method.align else '-'} | "
            f"warmup {W} (L={cfg.l2r_depth}) + {P} steps | batch {cfg.batch_size} x {world} proc | lr {cfg.lr:g} | "
            f"λ {sched} @ block {cfg.encoder_depth} | EMA {cfg.ema_decay} | rope {cfg.rope} qk-norm {cfg.qk_norm} | "
            f"{device.type} {'bf16' if amp else 'fp32'}{' compiled' if cfg.compile else ''} | out {cfg.out}")
    result = TrainResult(out=cfg.out, status="finished", steps=0)
    run_t0 = time.time()
    try:
        warm_model = None
        # ---------------------------------------------------------------- phase 1: warmup
        if state["phase"] == "warmup":
            warm_model = build_net(cfg, data, z_dims, warm=True)
            if encoders:
                check_token_grid(encoders, warm_model.x_embedder.num_patches, f"model {cfg.model}")
            status = _run_phase("warmup", cfg, warm_model, state, ckpt, data, encoders, indexer, schedule,
                                fused_align, amp, device, rank, world, log, bar, stop_flag, shape, result)
            ckpt = None
            if status != "finished":
                result.status = status
                return result
            state.update(phase="train", phase_step=0, phase_seconds=0.0)
        # ---------------------------------------------------------------- transfer
        model = build_net(cfg, data, z_dims, warm=False)
        if encoders:
            from ..encoders import check_token_grid

            check_token_grid(encoders, model.x_embedder.num_patches, f"model {cfg.model}")
        if ckpt is None and warm_model is not None:
            keys = transfer_warmup(warm_model.state_dict(), model)
            state["transfer"] = dict(from_step=W, num_keys=len(keys), keys=keys, l2r_depth=cfg.l2r_depth,
                                     warm_model_config=warm_model.config(),
                                     full_model_config=model.config())
            if main:
                log.write({"event": "transfer", **state["transfer"]})
                bar.message(f"transfer: copied {len(keys)} tensors (embedders, pos_embed, blocks 0..{cfg.l2r_depth - 1}, "
                            f"projectors) from warmup step {W}; fresh optimizer, EMA reset")
            del warm_model
        # ---------------------------------------------------------------- phase 2
        status = _run_phase("train", cfg, model, state, ckpt, data, encoders, indexer, schedule, fused_align,
                            amp, device, rank, world, log, bar, stop_flag, shape, result)
        result.status = status
        if status == "finished" and main:
            result.summary["total_seconds"] = time.time() - run_t0
            _print_summary(cfg, result, state, bar)
        return result
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        log.close()


def _run_phase(phase, cfg, model, state, ckpt, data, encoders, indexer, schedule, fused_align, amp, device,
               rank, world, log, bar, stop_flag, shape, result) -> str:
    """Run one phase from ``state['phase_step']``; returns finished | interrupted | stopped."""
    main = rank == 0
    warm = phase == "warmup"
    W = cfg.warmup_steps
    n_steps = W if warm else cfg.steps
    offset = 0 if warm else W
    method = get_method(cfg.method)
    model.to(device)
    ema_model = copy.deepcopy(model)
    ema_model.requires_grad_(False)
    ema = EMA(ema_model, model)
    opt = make_optimizer(model, cfg.lr, device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if "rng" in ckpt and "torch" in ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"]["torch"])
    objective = Objective(model, cfg.l2r_depth if warm else None, method.align, cfg.align_loss, cfg.temperature,
                          fused_align)
    stream = STREAM_WARMUP if warm else STREAM_TRAIN
    params = [p for p in model.parameters() if p.requires_grad]

    latent = getattr(data, "is_latent", False)
    need_pixels = any(not getattr(enc, "precomputed", False) for enc in encoders)

    precomputed = [getattr(enc, "precomputed", False) for enc in encoders]
    pin = device.type == "cuda"

    def host_batch(k):
        """Everything step ``k`` reads, on the host: a pure function of (seed, step), so it can run
        ahead in the prefetch thread. Latent data: shards gathered, posterior sampled (mean + std·ε)
        ·0.18215 with ε seeded per (seed, step, sample), encoder crops or precomputed features read."""
        gstep = offset + k
        idx, j = indexer.batch(gstep)
        if latent:
            eps = data.posterior_noise(cfg.seed, gstep, j.tolist())
            x, y, raw = data.batch(idx, eps, None, with_images=need_pixels)
        else:  # the embedded digits already live on the device
            x, y = data.images[idx], data.labels[idx]
            raw = x
        noise, t, drop = sample_draws(cfg.seed, stream, gstep, j.tolist(), shape, cfg.class_dropout,
                                      with_noise=not warm)
        if warm:
            t, noise = torch.zeros_like(t), None
        pre = [enc.features(idx) if p else None for enc, p in zip(encoders, precomputed)]
        out = (x, y, noise, t, drop, raw, pre)
        if pin:
            out = map_tensors(lambda v: v.pin_memory() if v.device.type == "cpu" else v, out)
        return out

    prefetch = Prefetcher(host_batch, depth=cfg.prefetch if latent else 0)

    def batch(k):
        x, y, noise, t, drop, raw, pre = map_tensors(lambda v: v.to(device, non_blocking=True),
                                                  prefetch.get(k))
        return x, y, (noise, t, drop), (raw, pre)

    def targets_for(raw, pre):
        """Target features: the encoder on the raw pixels (the batch's encoder crops for latent data,
        the images themselves for digits), or the precomputed fp16 features of these samples."""
        with torch.no_grad():
            return [p if p is not None else enc(raw) for enc, p in zip(encoders, pre)]

    def loss_terms(obj, k):
        x, y, (noise, t, drop), (raw, pre) = batch(k)
        tg = targets_for(raw, pre)
        lam = schedule(k) if (not warm and method.align) else 0.0
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss, align, vel = obj(x, noise, t, y, drop, tg, lam)
        return loss, align, vel, lam

    # FLOPs of one step (forward + backward + target encoder), on the eager model, before DDP
    step_flops = None
    def _one():
        loss, *_ = loss_terms(objective, state["phase_step"] if state["phase_step"] < n_steps else 0)
        loss.backward()

    try:
        step_flops = count_flops(_one) * world
    except Exception:  # pragma: no cover - flop counting is best effort
        step_flops = None
    for p in params:
        p.grad = None
    if cfg.compile:
        model.compile_blocks()
    runner = objective
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    def save(k, tag=""):
        if main:
            args = cfg.to_dict()
            args["model_config"] = model.config()
            args["num_classes"] = data.num_classes
            path = os.path.join(cfg.out, "checkpoints", f"{offset + k:07d}.pt")
            save_atomic({
                "model": {kk: v.detach().cpu() for kk, v in model.state_dict().items()},
                "ema": {kk: v.detach().cpu() for kk, v in ema_model.state_dict().items()},
                "opt": opt.state_dict(), "args": args, "steps": offset + k, "phase": phase, "phase_step": k,
                "transfer": state["transfer"], "warmup_cost": state["warmup_cost"],
                "phase_seconds": state["phase_seconds"] + (time.time() - t_start),
                "rng": {"torch": torch.get_rng_state()}, "format": "erw_fast.train/1",
            }, path)
            log.write({"event": "checkpoint", "path": path, "steps": offset + k, "phase": phase})
            result.checkpoint = path
        if world > 1:
            dist.barrier()

    k = state["phase_step"]
    t_start = time.time()
    bad_step = torch.tensor(-1, device=device)
    win = dict(loss=0.0, align=0.0, vel=0.0, n=0)
    win_t0, win_imgs = time.time(), 0
    last = {}
    status = "finished"
    while k < n_steps:
        gstep = offset + k
        loss, align, vel, lam = loss_terms(runner, k)
        if cfg.debug_nan_at_step is not None and gstep == cfg.debug_nan_at_step:
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True) if cfg.grad_clip > 0 \
            else torch.zeros((), device=device)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), torch.tensor(gstep, device=device),
                               bad_step)
        opt.step()
        ema.update(cfg.ema_decay)
        k += 1
        win_imgs += cfg.batch_size
        do_log = k % cfg.log_every == 0 or k == n_steps
        do_ckpt = ((cfg.ckpt_every and (offset + k) % cfg.ckpt_every == 0) or (warm and k == n_steps)
                   or (offset + k) in cfg.ckpt_at)
        stop_now = stop_flag["signal"] is not None
        if cfg.stop_after is not None and offset + k >= cfg.stop_after:
            stop_now = True
        stop_now = all_true(stop_now, world, device)
        if do_log or do_ckpt or stop_now:
            bad = int(bad_step.item())
            if world > 1:
                t = torch.tensor([bad], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                bad = int(t.item())
            if bad >= 0:
                msg = (f"non-finite loss (NaN/inf) at step {bad} ({phase}); stopping. The last good checkpoint "
                       f"is {result.checkpoint or 'none (no checkpoint was written yet)'}; lower --lr or check "
                       "the data")
                if main:
                    log.write({"event": "nonfinite", "step": bad, "phase": phase})
                    bar.message(msg)
                raise NonFiniteLossError(msg)
        if do_log:
            lv, av, vv = loss.item(), align.item(), vel.item()
            dt = max(time.time() - win_t0, 1e-9)
            rec = dict(phase=phase, step=offset + k, phase_step=k, loss=lv, loss_align=av, loss_velocity=vv,
                       **{"lambda": lam}, grad_norm=float(gnorm), img_per_s=win_imgs / dt, lr=cfg.lr,
                       time=time.time() - t_start + state["phase_seconds"])
            log.write(rec)
            last = rec
            fields = {"loss": lv}
            if method.align or warm:
                fields["align"] = av
            if not warm:
                fields["vel"] = vv
                if method.align:
                    fields["λ"] = lam
            fields["img/s"] = round(win_imgs / dt, 1)
            bar.update(phase, k, n_steps, fields, final=k == n_steps)
            win_t0, win_imgs = time.time(), 0
        if cfg.sample_every and not warm and (offset + k) % cfg.sample_every == 0 and k < n_steps:
            _sample_and_save(cfg, ema_model, data, device, offset + k, amp, main, log, result, world)
        if do_ckpt:
            save(k)
        if stop_now:
            why = f"signal {stop_flag['signal']}" if stop_flag["signal"] is not None else f"--stop-after {cfg.stop_after}"
            if not do_ckpt:
                save(k)
            if main:
                bar.message(f"stopped at step {offset + k} ({why}); checkpoint {result.checkpoint}. "
                            f"Continue with --resume --out {cfg.out}")
            status = "interrupted" if stop_flag["signal"] is not None else "stopped"
            break
    prefetch.close()
    seconds = state["phase_seconds"] + (time.time() - t_start)
    result.steps = offset + k
    if warm:
        if status == "finished":
            state["warmup_cost"] = dict(steps=W, seconds=seconds,
                                        flops_per_step=step_flops, flops_total=(step_flops or 0) * W,
                                        trained_params=sum(p.numel() for p in params),
                                        batch_size=cfg.batch_size)
            if main:
                log.write({"event": "warmup_cost", **state["warmup_cost"]})
                bar.message(f"warmup: {W} steps in {fmt_seconds(seconds)}, "
                            f"{human_flops((step_flops or 0) * W)} ({human_flops(step_flops or 0)}/step)")
        return status
    if status == "finished":
        if not ((cfg.ckpt_every and (offset + k) % cfg.ckpt_every == 0) or (offset + k) in cfg.ckpt_at):
            save(k)
        _sample_and_save(cfg, ema_model, data, device, offset + k, amp, main, log, result, world)
        result.summary.update(train_seconds=seconds, train_flops_per_step=step_flops, last=last,
                              warmup_cost=state["warmup_cost"], transfer_keys=(state["transfer"] or {}).get("num_keys"))
    return status


def _sample_and_save(cfg, ema_model, data, device, step, amp, main, log, result, world):
    """EMA sample grid (one row per class) → samples/<step>.png and samples.png; digit accuracy."""
    if main:
        from ..sampling import sample_grid
        from ..utils.png import image_grid, write_png

        t0 = time.time()
        ema_model.eval()
        latent = getattr(data, "is_latent", False)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            imgs = sample_grid(ema_model, data.num_classes, cfg.samples_per_class,
                               (data.channels, data.input_size, data.input_size), sampler=cfg.sampler,
                               steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                               guidance_interval=(0.0, cfg.guidance_high), seed=cfg.seed + 1_000_003,
                               device=device, classes=data.sample_classes() if latent else None)
        path = None
        if latent:  # keep the latents; decode with the dataset's VAE when it is available locally
            torch.save({"latents": imgs.float().cpu(), "classes": data.sample_classes(), "step": step},
                       os.path.join(cfg.out, "samples", f"{step:07d}.pt"))
            imgs = data.decode(imgs.float())
        if imgs is not None:
            imgs = imgs.float().clamp(-1, 1).cpu()
            grid = image_grid(imgs, nrow=cfg.samples_per_class, pad=1, scale=1 if latent else 2)
            path = write_png(os.path.join(cfg.out, "samples", f"{step:07d}.png"), grid)
            write_png(os.path.join(cfg.out, "samples.png"), grid)
            result.samples_png = os.path.join(cfg.out, "samples.png")
        rec = {"event": "samples", "step": step, "path": path, "seconds": time.time() - t0}
        acc = digit_accuracy(imgs, data.num_classes, cfg.samples_per_class) if cfg.data == "digits" else None
        if acc is not None:
            rec["sample_accuracy"] = acc
            result.summary["sample_accuracy"] = acc
        log.write(rec)
    if world > 1:
        dist.barrier()


def digit_accuracy(imgs, num_classes, per_class) -> Optional[float]:
    """Fraction of a class-major grid that the project's independent digits classifier reads as the
    requested digit (None when the classifier is not available)."""
    try:
        from ..evaluation.digits_classifier import predict
    except Exception:
        return None
    try:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        return float((predict(imgs) == labels).float().mean())
    except Exception:
        return None


def _print_summary(cfg, result, state, bar):
    s = result.summary
    wc = state.get("warmup_cost") or {}
    lines = [f"done: {cfg.method} {cfg.model} on {cfg.data}, {result.steps} steps in {fmt_seconds(s.get('total_seconds', 0))}"]
    if wc:
        lines.append(f"  warmup : {wc.get('steps')} steps, {fmt_seconds(wc.get('seconds', 0))}, "
                     f"{human_flops(wc.get('flops_total') or 0)}")
        if state.get("transfer"):
            lines.append(f"  transfer: {state['transfer']['num_keys']} tensors from step {state['transfer']['from_step']}")
    last = s.get("last") or {}
    lines.append(f"  train  : {cfg.steps} steps, {fmt_seconds(s.get('train_seconds', 0))}, "
                 f"{human_flops((s.get('train_flops_per_step') or 0) * cfg.steps)}; final loss {last.get('loss', float('nan')):.4f} "
                 f"(velocity {last.get('loss_velocity', float('nan')):.4f}, align {last.get('loss_align', float('nan')):.4f})")
    if "sample_accuracy" in s:
        lines.append(f"  samples: {s['sample_accuracy'] * 100:.0f}% read as the requested digit by the digits classifier")
    lines.append(f"  outputs: {result.checkpoint}, {result.samples_png}, {os.path.join(cfg.out, 'metrics.jsonl')}")
    bar.message("\n".join(lines))

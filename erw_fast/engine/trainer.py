"""``Trainer``: one phase's model, EMA, optimizer and objective, built once; ``train_step(batch)``
is the one training step (the CLI loop, the benchmarks, the GPU check and the tests all run it).

A step creates no device tensor from host values and reads nothing back from the device: the loss
terms and gradient norm stay on the device (read at log steps), and a non-finite loss is recorded
on the device with the step it happened at (checked at log/checkpoint steps).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from ..method.objective import Objective
from ..utils.flops import count_flops
from .batches import Batch
from .ema import EMA


def make_optimizer(model: nn.Module, lr: float, device) -> torch.optim.Optimizer:
    """AdamW (β 0.9/0.999, no weight decay, as REPA/ERW): fused on CUDA, foreach on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if torch.device(device).type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(params, **kw)


@dataclass
class StepOutput:
    """One step's loss terms and gradient norm (detached device tensors) and λ (a host float)."""
    loss: torch.Tensor
    align: torch.Tensor
    vel: torch.Tensor
    grad_norm: torch.Tensor
    lam: float


class Trainer:
    """Owns ``model`` (moved to ``device``), its EMA copy, AdamW and the ``objective``'s runner."""

    def __init__(self, model: nn.Module, objective: Objective, encoders: List, *, lr: float, ema_decay: float,
                 grad_clip: float, amp: bool, device, first_step: int = 0, grad_accum: int = 1,
                 fp8: Optional[str] = None):
        self.device = torch.device(device)
        on_device = all(t.device == self.device for t in (*model.parameters(), *model.buffers()))
        self.model = model if on_device else model.to(self.device)
        self.ema_model = copy.deepcopy(self.model)
        self.ema_model.requires_grad_(False)
        self.ema = EMA(self.ema_model, self.model)
        self.opt = make_optimizer(self.model, lr, self.device)
        self.objective, self.encoders = objective, encoders
        self.runner: nn.Module = objective
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_decay, self.grad_clip, self.amp, self.grad_accum = ema_decay, grad_clip, amp, int(grad_accum)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._step = torch.full((), int(first_step), dtype=torch.long, device=self.device)
        self.inject_nan_at: Optional[int] = None  # testing hook: a NaN loss at this (global) step
        self.lr, self.fsdp = lr, False
        self.fp8 = fp8  # the float8 recipe (--precision fp8): the linears are swapped in wrap()
        self.fp8_linears = 0

    # ---------------------------------------------------------------- state
    def load_state(self, ckpt: dict):
        self.model.load_state_dict(ckpt["model"])
        self.ema_model.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])

    def state(self) -> dict:
        """model, ema (full CPU copies) and optimizer state for a checkpoint. Under FSDP a collective:
        every rank calls it."""
        if self.fsdp:
            from . import fsdp

            state = fsdp.full_state(self.model, self.ema_model, self.opt, self._names)
        else:
            state = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                     "ema": {k: v.detach().cpu() for k, v in self.ema_model.state_dict().items()},
                     "opt": self.opt.state_dict()}
        if self.fp8:  # float8 all-gather (FSDP on CUDA) wraps weights in a subclass: store plain tensors
            from .fp8 import plain_tensor

            for key in ("model", "ema"):
                state[key] = {k: plain_tensor(v) for k, v in state[key].items()}
        return state

    def wrap(self, compile: bool = False, world: int = 1, fsdp: bool = False):
        """``--precision fp8`` (swap the large linears for torchao's float8 ones; the EMA copy stays
        plain), ``--compile`` (each SiT block, fullgraph), then DDP over the objective or FSDP2
        (``fsdp``); after counting FLOPs (on the eager, unsharded, bf16 model: MFU stays against the
        bf16 peak)."""
        if self.fp8:
            from .fp8 import convert_to_fp8

            self.fp8_linears = convert_to_fp8(self.model, self.fp8, self.device, fsdp=fsdp and world > 1)
        if compile:
            self.model.compile_blocks()
        if fsdp and world > 1:
            return self._shard(world)
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a stopped alignment leaves the projectors without gradients from then on
            self.runner = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=ids, find_unused_parameters=self.objective.may_stop_aligning)
        return self

    def _shard(self, world: int):
        """FSDP2: shard model (root: the objective) and EMA; the optimizer is rebuilt on the shards and
        given the state it had."""
        from . import fsdp

        self._names = fsdp.trainable_names(self.model)
        opt_state = self.opt.state_dict()
        mesh = fsdp._mesh(self.device, world)
        fsdp.shard(self.model, self.objective, mesh)
        fsdp.shard(self.ema_model, self.ema_model, mesh)
        self.ema = EMA(self.ema_model, self.model)
        self.opt = make_optimizer(self.model, self.lr, self.device)
        fsdp.load_opt_state(self.model, self.opt, opt_state, self._names)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.fsdp = True
        return self

    def sampling_model(self, template_factory=None):
        """The EMA model to sample from: itself, or under FSDP a full unsharded copy for rank 0
        (collective; the other ranks build nothing and get None)."""
        if not self.fsdp:
            return self.ema_model
        from . import fsdp

        return fsdp.full_copy(self.ema_model, template_factory, self.device)

    def use_objective(self, objective: Objective):
        """Swap the objective on the same model (one process; the benchmarks time the step kinds
        that share a model this way)."""
        if self.runner is not self.objective:
            raise RuntimeError("use_objective: the objective is wrapped in DDP; build a Trainer per objective")
        self.objective = self.runner = objective

    # ---------------------------------------------------------------- the step
    def targets(self, batch: Batch, k: int = 0) -> List[torch.Tensor]:
        """Target features at phase step ``k``: the encoder on the batch's pixels, or the precomputed
        features; none once the alignment has stopped."""
        return self._encode(batch) if self.objective.needs(k).targets else []

    @torch.no_grad()
    def _encode(self, batch: Batch) -> List[torch.Tensor]:
        return [f if f is not None else enc(batch.pixels) for enc, f in zip(self.encoders, batch.features)]

    def loss(self, batch: Batch, k: int, runner: Optional[nn.Module] = None):
        """(loss, align, vel, λ) of ``batch`` at phase step ``k``."""
        targets = self.targets(batch, k)
        lam = self.objective.weight(k)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss, align, vel = (runner or self.runner)(batch.x, batch.noise, batch.t, batch.y, batch.drop, targets,
                                                       lam)
        return loss, align, vel, lam

    def train_step(self, batch: Batch, k: int, global_step: Optional[int] = None) -> StepOutput:
        """Forward, backward, clip, AdamW, EMA for phase step ``k``; with ``grad_accum`` N the batch
        runs as N micro-batches whose gradients add up to the whole batch's (DDP syncs on the last)."""
        if self.grad_accum > 1:
            loss, align, vel, lam = self._accumulate(batch, k, global_step)
        else:
            loss, align, vel, lam = self.loss(batch, k)
            if self.inject_nan_at is not None and global_step == self.inject_nan_at:
                loss = loss * float("nan")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        gnorm = self.clip_gradients()
        first_bad = (self.bad_step < 0) & ~torch.isfinite(loss.detach())
        self.bad_step = torch.where(first_bad, self._step, self.bad_step)
        self._step.add_(1)
        self.opt.step()
        self.update_ema()
        return StepOutput(loss.detach(), align, vel, gnorm, 0.0 if lam is None else lam)

    def _accumulate(self, batch: Batch, k: int, global_step: Optional[int]):
        """Micro-batch forward/backward, each loss weighted 1/N (the batch losses are means over rows)."""
        parts = batch.split(self.grad_accum)
        self.opt.zero_grad(set_to_none=True)
        total = align_sum = vel_sum = None
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with self._grad_sync(last):
                loss, align, vel, lam = self.loss(part, k)
                if self.inject_nan_at is not None and global_step == self.inject_nan_at:
                    loss = loss * float("nan")
                (loss / len(parts)).backward()
            total = loss.detach() if total is None else total + loss.detach()
            align_sum = align if align_sum is None else align_sum + align
            vel_sum = vel if vel_sum is None else vel_sum + vel
        n = len(parts)
        return total / n, align_sum / n, vel_sum / n, lam

    def _grad_sync(self, enabled: bool):
        """No gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last micro-batch."""
        if self.fsdp:
            self.objective.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if enabled or not hasattr(self.runner, "no_sync"):
            return contextlib.nullcontext()
        return self.runner.no_sync()

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradient norm to ``grad_clip`` (0 = off: the norm is still measured, nothing is
        scaled); returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"),
                                              foreach=True)

    def update_ema(self):
        self.ema.update(self.ema_decay)

    def count_step_flops(self, batch: Batch, k: int) -> float:
        """FLOPs of one step's forward + backward (target encoder included) on the eager objective."""
        def one():
            loss, *_ = self.loss(batch, k, runner=self.objective)
            loss.backward()

        try:
            return count_flops(one)
        finally:
            for p in self.params:
                p.grad = None

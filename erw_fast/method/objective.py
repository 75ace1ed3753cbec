"""One step's loss: ERW's warmup or full training, and what that step needs as input.

Warmup (ERW phase 1): blocks 0..L−1 on the clean input (t = 0, no noise), alignment loss only.
Full training: velocity loss on x_t = (1 − t) x + t ε, plus λ(k)·alignment when the method aligns
(REPA, ERW); vanilla SiT has no alignment term. The per-sample draws (ε, t, label drop) are seeded
by (seed, phase stream, step, global sample index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn as nn

from ..transport import interpolate, velocity_loss
from ..utils.seeding import STREAM_TRAIN, STREAM_WARMUP, sample_draws
from .alignment import alignment_from_hidden
from .schedules import AlignmentSchedule


@dataclass(frozen=True)
class StepNeeds:
    noise: bool      # per-sample ε (the velocity term)
    targets: bool    # target-encoder features (the alignment term)


class Objective(nn.Module):
    """The loss of a phase as a module (so DDP can wrap it): ``forward(...) -> (loss, align, vel)``,
    the last two detached for logging."""

    def __init__(self, model, warm_blocks: Optional[int], align: bool, schedule: Optional[AlignmentSchedule],
                 kind: str = "cosine", temperature: float = 0.1, fused_align: Union[bool, str, None] = False):
        super().__init__()
        self.model = model
        self.warm_blocks = warm_blocks
        self.align = align or bool(warm_blocks)
        self.schedule = schedule
        self.kind = kind
        self.temperature = temperature
        self.fused_align = fused_align

    def aligning(self, k: int) -> bool:
        """Whether phase step ``k`` computes the alignment term (the warmup always does; full training
        while the method aligns and the schedule has not stopped it)."""
        if self.warm_blocks:
            return True
        return self.align and (self.schedule is None or self.schedule.active(k))

    def needs(self, k: int) -> StepNeeds:
        """What phase step ``k`` reads: no targets (no encoder, no features) once the alignment stopped."""
        return StepNeeds(noise=not self.warm_blocks, targets=self.aligning(k))

    @property
    def may_stop_aligning(self) -> bool:
        """True when some full-training step can leave the projectors without gradients."""
        return bool(self.align and not self.warm_blocks and self.schedule is not None
                    and (self.schedule.until is not None or self.schedule.minimum > 0))

    def draws(self, seed: int, step: int, sample_ids: List[int], shape, dropout: float):
        """(ε or None, t, label drop) of these samples at global ``step``; t = 0 in the warmup."""
        stream = STREAM_WARMUP if self.warm_blocks else STREAM_TRAIN
        noise, t, drop = sample_draws(seed, stream, step, sample_ids, shape, dropout, with_noise=not self.warm_blocks)
        if self.warm_blocks:
            t, noise = torch.zeros_like(t), None
        return noise, t, drop

    def weight(self, k: int) -> Optional[float]:
        """λ at phase step ``k``; None when the step has no alignment term (the warmup has only it:
        0 there; vanilla; stopped)."""
        if self.warm_blocks:
            return 0.0
        if not self.aligning(k) or self.schedule is None:
            return None
        return self.schedule(k)

    def forward(self, x, noise, t, y, drop, targets: List[torch.Tensor], lam: Optional[float]):
        """``lam=None``: velocity loss only (no projector run, no alignment loss)."""
        m = self.model
        if self.warm_blocks:
            h = m.forward_warmup(x, t, y, self.warm_blocks, force_drop_ids=drop, return_hidden=True)
            align = alignment_from_hidden(m, h, targets, self.kind, self.temperature, self.fused_align)
            return align, align.detach(), torch.zeros_like(align.detach())
        xt = interpolate(x, noise, t)
        out, h = m(xt, t, y, force_drop_ids=drop, return_hidden=True)
        vel = velocity_loss(out, x, noise)
        if not self.align or lam is None:
            return vel, torch.zeros_like(vel.detach()), vel.detach()
        align = alignment_from_hidden(m, h, targets, self.kind, self.temperature, self.fused_align)
        return vel + lam * align, align.detach(), vel.detach()

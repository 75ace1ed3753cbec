"""Exponential moving average of a model's floating-point parameters."""
from __future__ import annotations

import torch


class EMA:
    """``update(decay)``: ema ← ema + (1 − decay)·(param − ema), one ``torch._foreach_lerp_``."""

    def __init__(self, ema_model: torch.nn.Module, model: torch.nn.Module):
        self.ema_model = ema_model
        pairs = [(e, m) for e, m in zip(ema_model.parameters(), model.parameters()) if m.is_floating_point()]
        self.ema_params = [e for e, _ in pairs]
        self.model_params = [m for _, m in pairs]
        for p in ema_model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, decay: float):
        torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)

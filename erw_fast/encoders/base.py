"""The target-encoder interface and registry."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn

ENCODERS: Dict[str, Callable[..., "TargetEncoder"]] = {}


class TargetEncoder(nn.Module):
    """A frozen feature extractor used as the alignment target.

    Subclasses set ``name``, ``dim`` (feature width C) and ``token_grid`` (tokens per side, so
    T = token_grid**2) and implement ``encode(images) -> (B, T, C)``, where ``images`` are in the
    model's pixel space (for the digits: (B, 1, 16, 16) in [-1, 1]); any resizing or
    normalisation the encoder needs happens inside. ``forward`` runs ``encode`` under ``no_grad``
    (and bf16 autocast on CUDA when ``reduced_precision``) and returns fp32 features.
    """

    name: str = "encoder"
    dim: int = 0
    token_grid: int = 0
    reduced_precision: bool = True

    @property
    def num_tokens(self) -> int:
        return self.token_grid ** 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def freeze(self) -> "TargetEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        use_bf16 = self.reduced_precision and images.is_cuda
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            feats = self.encode(images)
        return feats.float()


def register_encoder(name: str):
    """Decorator: register a builder ``fn(**kwargs) -> TargetEncoder`` under ``name``."""

    def deco(fn):
        ENCODERS[name] = fn
        return fn

    return deco


def build_encoder(name: str, device=None, **kwargs) -> TargetEncoder:
    """Build a registered target encoder, frozen, on ``device``."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(sorted(ENCODERS))}")
    enc = ENCODERS[name](**kwargs).freeze()
    return enc.to(device) if device is not None else enc


def build_encoders(spec: str, device=None, **kwargs) -> List[TargetEncoder]:
    """Comma-separated names (REPA's ``--enc-type`` style) to a list of encoders."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("no target encoder named")
    return [build_encoder(n, device=device, **kwargs) for n in names]


def check_token_grid(encoders, num_tokens: int, what: str = "model") -> None:
    """Raise a clear error when an encoder's token count differs from the model's."""
    for enc in encoders:
        if enc.num_tokens != num_tokens:
            raise ValueError(
                f"target encoder {enc.name!r} gives {enc.token_grid}x{enc.token_grid} = {enc.num_tokens} "
                f"tokens but the {what} has {num_tokens} patch tokens; choose a model patch size / "
                "input size with the same token grid, or another encoder"
            )

"""The methods as recipes: which phases run, whether phase 2 aligns, the default λ schedule, and the
per-model-size defaults of ERW's warmup region, alignment block and λ0.

Add a method (an ablation, a control) with one ``METHODS`` entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

PHASE_WARMUP, PHASE_TRAIN = "warmup", "train"


@dataclass(frozen=True)
class MethodSpec:
    """``warmup``: run ERW's phase 1 and the transfer; ``align``: add the alignment loss in phase 2;
    ``schedule``: its default λ schedule."""

    name: str
    warmup: bool
    align: bool
    schedule: str
    description: str

    @property
    def phases(self) -> Tuple[str, ...]:
        return (PHASE_WARMUP, PHASE_TRAIN) if self.warmup else (PHASE_TRAIN,)

    @property
    def needs_encoder(self) -> bool:
        return self.warmup or self.align


METHODS: Dict[str, MethodSpec] = {
    "erw": MethodSpec("erw", True, True, "halflife",
                      "ERW: warm up blocks 0..L-1 + projector on the alignment loss, transfer, then "
                      "velocity + decaying λ·alignment"),
    "repa": MethodSpec("repa", False, True, "constant",
                       "REPA: velocity + constant λ·alignment from scratch"),
    "vanilla": MethodSpec("vanilla", False, False, "constant", "SiT: velocity loss only"),
    # control: ERW's decaying λ without the warmup (REPA's loss with ERW's schedule)
    "erw-nowarmup": MethodSpec("erw-nowarmup", False, True, "halflife",
                               "control: ERW's decaying λ·alignment from scratch, no warmup"),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


# Per model size: ERW's warmup region (l2r depth), the alignment block, λ0. XL/L/B follow the ERW/REPA
# releases (XL: L=4, alignment at block 14, λ0 6; L: 8, 3; B/S: 4, 1); D/T are this project's CPU sizes;
# D8 keeps XL's proportions on the digits (warmup region 1 of 8 blocks ≈ XL's 4 of 28, alignment at half depth).
MODEL_DEFAULTS = {
    "D": dict(l2r_depth=2, encoder_depth=2, lambda0=1.0),
    "T": dict(l2r_depth=2, encoder_depth=3, lambda0=1.0),
    "D8": dict(l2r_depth=1, encoder_depth=4, lambda0=1.0),
    "S": dict(l2r_depth=4, encoder_depth=4, lambda0=1.0),
    "B": dict(l2r_depth=4, encoder_depth=4, lambda0=1.0),
    "L": dict(l2r_depth=4, encoder_depth=8, lambda0=3.0),
    "XL": dict(l2r_depth=4, encoder_depth=14, lambda0=6.0),
}


def model_defaults(size: str, depth: int) -> dict:
    """The recipe's defaults for a model size (a rule of thumb for sizes without an entry)."""
    return dict(MODEL_DEFAULTS.get(size) or dict(l2r_depth=max(1, min(4, depth // 3)),
                                                encoder_depth=max(1, depth // 2), lambda0=1.0))

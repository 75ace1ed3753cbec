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
    recipe: str = "erw"  # whose per-size defaults it takes (``RECIPES``): alignment block, λ0, RoPE

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
                       "REPA: velocity + constant λ·alignment from scratch (REPA's recipe: λ 0.5, block 8 of "
                       "L/XL, 4 of B/S, no RoPE)", recipe="repa"),
    "vanilla": MethodSpec("vanilla", False, False, "constant", "SiT: velocity loss only (no RoPE, as SiT)",
                          recipe="sit"),
    # control: ERW's decaying λ without the warmup (REPA's loss with ERW's schedule)
    "erw-nowarmup": MethodSpec("erw-nowarmup", False, True, "halflife",
                               "control: ERW's decaying λ·alignment from scratch, no warmup"),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


# ERW's per-size values: the warmup region (l2r depth), the alignment block, λ0. XL/L/B follow the ERW
# release (XL: L=4, alignment at block 14, λ0 6; L: 8, 3; B/S: 4, 1); D/T are this project's CPU sizes;
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
ERW_MODEL_DEFAULTS = MODEL_DEFAULTS

# REPA's own recipe (Yu et al. 2025): constant λ 0.5, alignment at block 8 of L/XL and 4 of B/S (a third of
# the depth), no RoPE. Our CPU sizes take the same third of their depth, rounded: D (4 blocks) 1, T (6) 2,
# D8 (8) 3. REPA has no warmup; l2r_depth is kept at ERW's value only so that the field is never empty.
REPA_MODEL_DEFAULTS = {
    size: dict(l2r_depth=MODEL_DEFAULTS[size]["l2r_depth"], encoder_depth=block, lambda0=0.5)
    for size, block in dict(D=1, T=2, D8=3, S=4, B=4, L=8, XL=8).items()
}


@dataclass(frozen=True)
class Recipe:
    """Whose per-size defaults a method takes: ``table`` (size → l2r_depth, encoder_depth, lambda0),
    ``rope`` (2-D RoPE in attention) and, for sizes without an entry, the share of the depth at which
    the alignment sits."""
    name: str
    table: Dict[str, dict]
    rope: bool
    align_share: float
    lambda0: float


RECIPES: Dict[str, Recipe] = {
    "erw": Recipe("ERW's", MODEL_DEFAULTS, rope=True, align_share=1 / 2, lambda0=1.0),
    "repa": Recipe("REPA's", REPA_MODEL_DEFAULTS, rope=False, align_share=1 / 3, lambda0=0.5),
    # vanilla SiT has no alignment: the block and λ0 are unused (ERW's are stored); SiT has no RoPE
    "sit": Recipe("SiT's", MODEL_DEFAULTS, rope=False, align_share=1 / 2, lambda0=1.0),
}


def model_defaults(size: str, depth: int, method: str = "erw") -> dict:
    """The defaults of ``method``'s recipe for a model size: l2r_depth, encoder_depth, lambda0, rope
    (a rule of thumb for sizes without an entry)."""
    recipe = RECIPES[get_method(method).recipe]
    row = recipe.table.get(size) or dict(l2r_depth=max(1, min(4, depth // 3)),
                                         encoder_depth=max(1, round(depth * recipe.align_share)),
                                         lambda0=recipe.lambda0)
    return dict(row, rope=recipe.rope)


def describe_recipe(method: str) -> str:
    """``"REPA's"``, ``"ERW's"``, ``"SiT's"``: whose defaults ``method`` takes (for the banner)."""
    return RECIPES[get_method(method).recipe].name

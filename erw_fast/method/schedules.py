"""λ(k): the alignment weight at phase-2 step k (k = 0 at the first step after the transfer).

A registry: ``SCHEDULES[name] = (weight(k, s) -> float, check(s) -> None)`` where ``s`` is the
``AlignmentSchedule``. Add one with ``register_schedule``.

- ``halflife`` (ERW's code): λ0 · 2^(−k / half_life); ``AlignmentSchedule()(50_000) == 3.0``.
- ``exp`` (ERW's paper): λ0 · exp(−k / tau); tau defaults to half_life / ln 2, the same curve.
- ``constant`` (REPA): λ0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

SCHEDULES: Dict[str, Tuple[Callable, Callable]] = {}


def register_schedule(name: str, check: Optional[Callable] = None):
    def deco(fn):
        SCHEDULES[name] = (fn, check or (lambda s: None))
        return fn
    return deco


def _check_half_life(s):
    if not s.half_life > 0:
        raise ValueError(f"half_life must be > 0, got {s.half_life}")


def _tau(s) -> float:
    return s.tau if s.tau is not None else s.half_life / math.log(2.0)


def _check_tau(s):
    if not (s.tau if s.tau is not None else s.half_life) > 0:
        raise ValueError("tau (or half_life) must be > 0 for the exp schedule")


@register_schedule("constant")
def _constant(k, s) -> float:
    return float(s.lambda0)


@register_schedule("halflife", _check_half_life)
def _halflife(k, s) -> float:
    return float(s.lambda0 * 2.0 ** (-k / s.half_life))


@register_schedule("exp", _check_tau)
def _exp(k, s) -> float:
    return float(s.lambda0 * math.exp(-k / _tau(s)))


SCHEDULE_KINDS = ("halflife", "exp", "constant")  # the built-in ones; SCHEDULES also has registered additions


@dataclass(frozen=True)
class AlignmentSchedule:
    """λ(k) for the phase-2 step ``k``; ``kind`` names a registered schedule.

    The alignment stops (``active(k)`` false, λ = 0) from phase step ``until`` on (HASTE's stop;
    ``--align-until``), and once the schedule has decayed below ``minimum`` (``--lambda-min``)."""

    kind: str = "halflife"
    lambda0: float = 6.0
    half_life: float = 50_000
    tau: Optional[float] = None
    until: Optional[int] = None
    minimum: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lambda schedule {self.kind!r}; choose one of {tuple(SCHEDULES)}")
        if self.lambda0 < 0:
            raise ValueError(f"lambda0 must be >= 0, got {self.lambda0}")
        SCHEDULES[self.kind][1](self)
        if self.until is not None and self.until < 0:
            raise ValueError(f"--align-until must be >= 0, got {self.until}")
        if not self.minimum >= 0:
            raise ValueError(f"--lambda-min must be >= 0, got {self.minimum}")

    def _value(self, k) -> float:
        if k < 0:
            raise ValueError(f"phase-2 step must be >= 0, got {k}")
        return SCHEDULES[self.kind][0](k, self)

    def active(self, k: Union[int, float]) -> bool:
        """Whether the alignment term is computed at phase step ``k``."""
        if self.until is not None and k >= self.until:
            return False
        return not (self.minimum > 0 and self._value(k) < self.minimum)

    def __call__(self, k: Union[int, float]) -> float:
        return self._value(k) if self.active(k) else 0.0

    def first_inactive(self, steps: int) -> Optional[int]:
        """The first phase step < ``steps`` at which the alignment is off (None if never)."""
        if self.until is None and not self.minimum > 0:
            return None
        return next((k for k in range(steps) if not self.active(k)), None)

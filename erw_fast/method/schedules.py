"""λ(k): the alignment weight at phase-2 step k (k = 0 at the first step after the transfer).

A registry: ``SCHEDULES[name] = (weight(k, s) -> float, check(s) -> None)`` where ``s`` is the
``AlignmentSchedule``. Add one with ``register_schedule``; a schedule may also register
``first_below(s, m)``: the real step x from which λ < m (its closed-form inverse), so the step at
which ``--lambda-min`` stops the alignment is found in constant time however long the run
(``FIRST_BELOW``). A schedule registered without one is searched by bisection, which assumes λ
does not increase with k.

- ``halflife`` (ERW's code): λ0 · 2^(−k / half_life); ``AlignmentSchedule()(50_000) == 3.0``.
- ``exp`` (ERW's paper): λ0 · exp(−k / tau); tau defaults to half_life / ln 2, the same curve.
- ``constant`` (REPA): λ0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

SCHEDULES: Dict[str, Tuple[Callable, Callable]] = {}
FIRST_BELOW: Dict[str, Callable] = {}  # name -> first_below(s, m): real x with λ(k) < m for k > x (inf: never)


def register_schedule(name: str, check: Optional[Callable] = None, first_below: Optional[Callable] = None):
    def deco(fn):
        SCHEDULES[name] = (fn, check or (lambda s: None))
        if first_below is not None:
            FIRST_BELOW[name] = first_below
        else:
            FIRST_BELOW.pop(name, None)
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


def _decay_below(scale):
    """first_below for λ0·exp(−k/scale(s)): λ < m from k > scale·ln(λ0/m)."""
    def first_below(s, m):
        if s.lambda0 < m:
            return -1.0
        return scale(s) * math.log(s.lambda0 / m)
    return first_below


@register_schedule("constant", first_below=lambda s, m: -1.0 if s.lambda0 < m else math.inf)
def _constant(k, s) -> float:
    return float(s.lambda0)


@register_schedule("halflife", _check_half_life, _decay_below(lambda s: s.half_life / math.log(2.0)))
def _halflife(k, s) -> float:
    return float(s.lambda0 * 2.0 ** (-k / s.half_life))


@register_schedule("exp", _check_tau, _decay_below(_tau))
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

    def _below(self, k: int) -> bool:
        return self.minimum > 0 and self._value(k) < self.minimum

    def _first_below(self, steps: int) -> int:
        """The first k in 0..steps at which λ(k) < ``minimum`` (``steps`` if none before it): the
        schedule's closed-form inverse, corrected for rounding by a step or two; bisection otherwise."""
        if not self.minimum > 0:
            return steps
        inverse = FIRST_BELOW.get(self.kind)
        if inverse is None:
            lo, hi = 0, steps  # λ non-increasing: the first k below the minimum, by bisection
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self._below(mid) else (mid + 1, hi)
            return lo
        x = inverse(self, self.minimum)
        if not x < steps:
            return steps
        k = max(0, int(math.floor(x)))
        while k > 0 and self._below(k - 1):
            k -= 1
        while k < steps and not self._below(k):
            k += 1
        return k

    def first_inactive(self, steps: int) -> Optional[int]:
        """The first phase step < ``steps`` at which the alignment is off (None if never); constant
        time for the built-in schedules, however large ``steps``."""
        k = min(self._first_below(steps), steps if self.until is None else self.until)
        return k if k < steps else None

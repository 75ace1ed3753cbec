"""Equal compute: how many steps of each kind every arm gets from the budget, where it is evaluated,
and the arithmetic on its curves (the compute at which one arm reaches another's FID).

FLOPs per step (``flops``) are counted as the trainer counts them (forward + backward + the target
encoder when it runs): ``vanilla``, ``full`` (a REPA/ERW step), ``warmup`` (an ERW warmup step),
``unaligned`` (a REPA/ERW step after the alignment stopped) and ``features`` (the one-off extraction of
the target features; 0 when the encoder runs online). The budget is ``budget_steps`` REPA steps plus
the extraction, so REPA gets exactly ``budget_steps`` steps and vanilla, which needs no features,
spends the extraction's share on training too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import Arm


@dataclass
class RunPlan:
    arm: str
    method: str
    warmup_steps: int
    steps: int                          # phase-2 (full) steps
    align_until: Optional[int]          # phase-2 step from which the alignment stops (None: never)
    features_flops: float               # the one-off feature extraction charged to this arm
    eval_steps: List[int] = field(default_factory=list)      # total steps (warmup included)
    eval_fractions: List[float] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


def segments(flops: Dict[str, float], plan: RunPlan) -> List[Tuple[int, float]]:
    """The run as (number of steps, FLOPs per step) in order: warmup, aligned, unaligned."""
    if plan.method == "vanilla":
        return [(plan.steps, flops["vanilla"])]
    on = plan.steps if plan.align_until is None else min(plan.align_until, plan.steps)
    return [(plan.warmup_steps, flops["warmup"]), (on, flops["full"]), (plan.steps - on, flops["unaligned"])]


def compute_at(flops: Dict[str, float], plan: RunPlan, total_step: int) -> float:
    """Training FLOPs spent by ``plan``'s run after ``total_step`` steps (extraction and warmup counted)."""
    spent, left = plan.features_flops, total_step
    for n, per in segments(flops, plan):
        take = min(n, left)
        spent, left = spent + take * per, left - take
    return spent


def _steps_for(target: float, segs: List[Tuple[int, float]]) -> int:
    """The number of steps after which ``target`` FLOPs are spent (nearest step), walking ``segs``."""
    done = 0
    for i, (n, per) in enumerate(segs):
        if target <= n * per or i == len(segs) - 1:
            return done + int(round(max(target, 0.0) / per))
        target, done = target - n * per, done + n
    return done


def _plan_arm(arm: Arm, flops: Dict[str, float], budget: float) -> RunPlan:
    extraction = flops.get("features", 0.0) if arm.aligns else 0.0
    if arm.method == "vanilla":
        return RunPlan(arm.name, arm.method, 0, int(round(budget / flops["vanilla"])), None, 0.0)
    w = int(round(arm.warmup * budget / flops["warmup"])) if arm.method == "erw" else 0
    left = budget - extraction - w * flops["warmup"]
    if left < flops["full"]:
        raise ValueError(f"arm {arm.name}: the budget ({budget:.3g} FLOPs) does not cover its {w} warmup steps and one "
                         "full step; raise --budget-steps or lower --warmup-fractions")
    if arm.stop is None:
        return RunPlan(arm.name, arm.method, w, int(round(left / flops["full"])), None, extraction)
    on = max(0, int(round((arm.stop * budget - extraction - w * flops["warmup"]) / flops["full"])))
    off = int(round((left - on * flops["full"]) / flops["unaligned"]))
    return RunPlan(arm.name, arm.method, w, on + off, on, extraction)


def _eval_points(plan: RunPlan, flops: Dict[str, float], budget: float, points: int):
    """Evaluations at ``points`` equal shares of the budget; none inside ERW's warmup (the warmup
    model cannot sample) or before the first full step."""
    segs = segments(flops, plan)
    head = plan.features_flops + (plan.warmup_steps * flops["warmup"] if plan.method != "vanilla" else 0.0)
    phase2 = segs[1:] if plan.method != "vanilla" else segs
    for i in range(1, points + 1):
        q = i / points
        if q * budget - head < 0.5 * phase2[0][1]:
            continue
        k = plan.total_steps if i == points else \
            plan.warmup_steps + min(plan.steps, max(1, _steps_for(q * budget - head, phase2)))
        if k not in plan.eval_steps:
            plan.eval_steps.append(k)
            plan.eval_fractions.append(q)


def plan_runs(flops: Dict[str, float], budget_steps: int, points: int,
              arms: Sequence[Arm]) -> Tuple[float, Dict[str, RunPlan]]:
    """The budget (``budget_steps`` REPA steps + the extraction) and every arm's plan."""
    if budget_steps < 1 or points < 2:
        raise ValueError(f"--budget-steps must be >= 1 and --points >= 2, got {budget_steps} and {points}")
    budget = budget_steps * flops["full"] + flops.get("features", 0.0)
    plans = {}
    for arm in arms:
        plan = _plan_arm(arm, flops, budget)
        _eval_points(plan, flops, budget, points)
        plans[arm.name] = plan
    return budget, plans


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------
def crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> Tuple[Optional[float], str]:
    """The first x at which the curve (xs, ys) reaches ``ys <= target``, linearly interpolated between
    evaluation points: (x, "interpolated"), (xs[0], "at_first") when the first point is already there
    (the true crossing is at or before it), or (None, "not_reached")."""
    if len(xs) != len(ys) or not len(xs):
        raise ValueError("crossing needs equally long, non-empty xs and ys")
    if ys[0] <= target:
        return float(xs[0]), "at_first"
    for i in range(1, len(xs)):
        if ys[i] <= target:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(x0 + (y0 - target) / (y0 - y1) * (x1 - x0)), "interpolated"
    return None, "not_reached"


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def curve(results: List[dict], arm: str, seed: int) -> List[dict]:
    return sorted((r for r in results if r["arm"] == arm and r["seed"] == seed), key=lambda r: r["step"])


def compute_ratios(results: List[dict], budget: float, seeds: Sequence[int], arm: str, target_of: str,
                   reference: str = "repa", key: str = "fid") -> List[dict]:
    """Per seed: the share of the budget ``arm`` needs to reach ``target_of``'s final FID (same seed),
    in FLOPs, and in seconds over ``reference``'s total seconds."""
    rows = []
    for s in seeds:
        c, t, ref = curve(results, arm, s), curve(results, target_of, s), curve(results, reference, s)
        if not c or not t or t[-1]["fraction"] != 1.0:  # the target is the final FID (the end of the budget)
            continue
        ref = ref if ref and ref[-1]["fraction"] == 1.0 else []
        target = t[-1][key]
        x, kind = crossing([r["flops"] for r in c], [r[key] for r in c], target)
        sec, _ = crossing([r["seconds"] for r in c], [r[key] for r in c], target)
        rows.append(dict(seed=s, target_fid=target, kind=kind, flops=x, ratio=(x / budget if x is not None else None),
                         seconds_ratio=(sec / ref[-1]["seconds"] if sec is not None and ref else None),
                         seconds_ratio_na=not ref))  # no finished reference run: no seconds to compare with
    return rows


BOUND = {"at_first": "≤ ", "ref_at_first": "≥ ", "both_at_first": "~"}  # a crossing at a first evaluation


def format_ratio(rows: List[dict], key: str = "ratio", fmt: str = "{:.2f}") -> str:
    """``mean ± std (seed 0: …; seed 1: …)``; seeds that never got there are named, not averaged away
    (``n/a``: the row's ``<key>_na`` says there was nothing to measure against). A crossing at the first
    evaluation is only a bound ("≤"; "≥" for a ratio whose reference crossed there; "~" both)."""
    if not rows or all(r.get(key + "_na") for r in rows):
        return "n/a"
    parts, vals = [], [r[key] for r in rows]
    for r, v in zip(rows, vals):
        parts.append(f"seed {r['seed']}: {'n/a' if r.get(key + '_na') else 'not reached'}" if v is None else
                     f"seed {r['seed']}: {BOUND.get(r['kind'], '')}{fmt.format(v)}")
    got = [v for v in vals if v is not None]
    if not got:
        return f"not reached in {'any of the' if len(vals) > 1 else 'the'} {len(vals)} seed{'s' * (len(vals) > 1)}"
    if len(got) < len(vals):
        head = f"**not reached in {len(vals) - len(got)} of {len(vals)} seeds**"
    else:
        m, s = mean_std(got)
        head = f"**{fmt.format(m)} ± {fmt.format(s)}**" if len(got) > 1 else f"**{fmt.format(m)}**"
    return f"{head} ({'; '.join(parts)})"


# --------------------------------------------------------------------------------------------
# The speed figure: compute to reach fixed FID targets
# --------------------------------------------------------------------------------------------
TARGET_QUANTILES = (0.25, 0.5, 0.75)


def fid_targets(final_fids: Dict[str, float], given: Optional[Sequence[float]] = None) -> List[float]:
    """The FID targets τ: ``given`` (``--fid-targets``), else fixed by a rule stated before the run and
    blind to which arm is which: the targets lie at the shares ``TARGET_QUANTILES`` between the best
    and the worst arm's mean final FID on a log scale, τ_q = best · (worst / best)^(1 - q) (so q = 0.75 is
    near the best arm's final FID), rounded up at the 3rd significant digit (so no target falls below
    the best final FID); every arm's final FID counts alike."""
    if given:
        return sorted({float(t) for t in given}, reverse=True)
    vals = [v for v in final_fids.values() if v is not None and np.isfinite(v) and v > 0]
    if not vals:
        return []
    lo, hi = min(vals), max(vals)
    return sorted({_round_up(lo * (hi / lo) ** (1 - q)) for q in TARGET_QUANTILES}, reverse=True)


def _round_up(v: float, digits: int = 3) -> float:
    unit = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return float(f"{math.ceil(v / unit - 1e-9) * unit:.{digits}g}")


def reach_rows(results: List[dict], budget: float, seeds: Sequence[int], arm: str, target: float,
               key: str = "fid") -> List[dict]:
    """Per seed that evaluated ``arm``: the compute (share of the budget, FLOPs) and training seconds at
    which its FID curve first reaches ``target`` (interpolated between evaluations; ``kind``
    "at_first" / "interpolated" / "not_reached": never extrapolated past the last evaluation)."""
    rows = []
    for s in seeds:
        c = curve(results, arm, s)
        if not c:
            continue
        x, kind = crossing([r["flops"] for r in c], [r[key] for r in c], target)
        sec, _ = crossing([r["seconds"] for r in c], [r[key] for r in c], target)
        rows.append(dict(seed=s, target_fid=target, kind=kind, flops=x,
                         ratio=(x / budget if x is not None else None), seconds=sec))
    return rows


def relative_rows(rows: List[dict], reference: List[dict]) -> List[dict]:
    """Per seed both reached the target: the arm's compute over the reference's (e.g. ERW's over REPA's)."""
    ref = {r["seed"]: r for r in reference if r["flops"] is not None}
    kinds = {(False, False): "interpolated", (True, False): "at_first", (False, True): "ref_at_first",
             (True, True): "both_at_first"}
    return [dict(seed=r["seed"], kind=kinds[(r["kind"] == "at_first", ref[r["seed"]]["kind"] == "at_first")],
                 ratio=r["flops"] / ref[r["seed"]]["flops"])
            for r in rows if r["flops"] is not None and r["seed"] in ref]

"""Does a reused foundation pay? The study behind ``python -m erw_fast.reuse_study``.

Per seed: one ERW warmup on the first task (the digits 0–4: the foundation), then on the second task
(the digits 5–9) at equal compute:

- ``reuse``: full ERW from the foundation (``--warmup-from``), the reused warmup counted as 0;
- ``reuse-charged``: the same, with the foundation's cost (its warmup steps and its one-off feature
  extraction) charged to the second task in full;
- ``erw``: ERW with its own warmup on 5–9 (the same number of warmup steps as the foundation);
- ``repa``: REPA on 5–9.

The budget is ``budget_steps`` REPA steps on 5–9 plus the one-off feature extraction of the 5–9
images; each arm's full-training steps are what its share of the budget buys (FLOPs counted as the
trainer counts them). Every arm's final EMA model draws the same ``num_samples`` samples, scored by
FID against the real 5–9 digits in the feature space of the project's digits classifier and by the
share of samples that classifier reads as the requested digit (class k of a ``digits:5-9`` run is
the digit 5 + k). The settings are written to ``out/settings.json`` before the first run; a rerun
with other settings in the same ``out`` is refused, more seeds are added to it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
import shutil
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.runlock import RunLock
from .execute import StudyError, StudyStopped, cores, read_jsonl, say, shared_architecture, stoppable_pool
from .plan import mean_std

ARMS = ("reuse", "reuse-charged", "erw", "repa")
LABELS = {"reuse": "ERW from the 0–4 foundation (reused warmup counted as 0)",
          "reuse-charged": "ERW from the 0–4 foundation (its warmup and extraction charged in full)",
          "erw": "ERW with its own warmup on 5–9", "repa": "REPA on 5–9"}


@dataclass
class ReuseConfig:
    out: str = "runs/reuse-study"
    doc: Optional[str] = None        # None: <out>/reuse.md ('' = none)
    seeds: Tuple[int, ...] = (0, 1, 2)
    first: str = "digits:0-4"        # the foundation's task
    second: str = "digits:5-9"       # the task it is reused on
    # the runs (the trainer's digits defaults where None)
    model: str = "SiT-D/2"
    encoder: Optional[str] = None    # the target encoder (None: the trainer's digits default)
    features: str = "precomputed"    # the digits' target features: extracted once (counted) or online
    projector_dim: Optional[int] = None
    batch_size: Optional[int] = None
    budget_steps: int = 150          # the second task's budget per arm, in REPA steps (+ its feature extraction)
    warmup_fraction: float = 0.2     # the share of the budget the erw arm (and the foundation) spends warming up
    # the evaluation (the fields evaluate_checkpoint reads)
    num_samples: int = 250
    sampler: str = "sde"
    sample_steps: int = 25
    cfg_scale: float = 1.0
    eval_seed: int = 12345
    eval_batch: int = 125
    # the machine
    jobs: int = 2
    threads: Optional[int] = None
    quick: bool = False
    plan_only: bool = False


QUICK = dict(out="runs/reuse-study-quick", seeds=(0,), budget_steps=6, batch_size=8, features="online", num_samples=20,
             sample_steps=2,
             eval_batch=20)
SETTINGS = ("first", "second", "model", "encoder", "features", "projector_dim", "batch_size", "budget_steps",
            "warmup_fraction", "num_samples", "sampler", "sample_steps", "cfg_scale", "eval_seed")


def reuse_config(quick: bool = False, **given) -> ReuseConfig:
    """The preset (or ``quick``) with the given fields on top (None = the preset's), checked."""
    known = {f.name for f in fields(ReuseConfig)}
    if set(given) - known:
        raise TypeError(f"unknown reuse-study settings {sorted(set(given) - known)}")
    cfg = replace(ReuseConfig(**(QUICK if quick else {}), quick=quick),
                  **{k: v for k, v in given.items() if v is not None})
    if cfg.budget_steps < 1 or not cfg.seeds or cfg.num_samples < 2 or cfg.jobs < 1:
        raise ValueError("--budget-steps >= 1, --seeds (at least one), --num-samples >= 2 and --jobs >= 1 are needed")
    if not 0 < cfg.warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction must lie in (0, 1), got {cfg.warmup_fraction}")
    return cfg


def settings(cfg: ReuseConfig) -> dict:
    """What the runs depend on, with the trainer's defaults filled in (written before the first run)."""
    from ..engine.config import resolve_config

    tc = resolve_config(train_config(cfg, "erw", cfg.second))
    out = {k: getattr(cfg, k) for k in SETTINGS}
    out.update(encoder=tc.encoder, projector_dim=tc.projector_dim, batch_size=tc.batch_size, lr=tc.lr,
               l2r_depth=tc.l2r_depth, encoder_depth=tc.encoder_depth, lambda0=tc.lambda0, half_life=tc.half_life,
               ema_decay=tc.ema_decay)
    return out


# --------------------------------------------------------------------------------------------
# The plan: FLOPs per step and each arm's steps
# --------------------------------------------------------------------------------------------
def train_config(cfg: ReuseConfig, method: str, data: str, **kw):
    """Every arm (REPA's too) shares ERW's architecture for ``cfg.model``, as in the convergence study."""
    from ..engine import TrainConfig

    return TrainConfig(method=method, model=cfg.model, data=data, encoder=cfg.encoder, features=cfg.features,
                       projector_dim=cfg.projector_dim, batch_size=cfg.batch_size, **shared_architecture(cfg), **kw)


@dataclass
class ReusePlan:
    flops: Dict[str, float]          # full, warmup (per step), features_first, features_second (once)
    budget: float
    warmup_steps: int                # the foundation's and the erw arm's warmup
    steps: Dict[str, int]            # full-training steps per arm
    charged: Dict[str, float]        # the second task's FLOPs per arm as counted (reuse: the warmup as 0)


def plan(cfg: ReuseConfig) -> ReusePlan:
    from ..engine.build import measure_step_flops

    second = measure_step_flops(train_config(cfg, "erw", cfg.second, warmup_steps=1))
    first = measure_step_flops(train_config(cfg, "erw", cfg.first, warmup_steps=1))
    full, warm = float(second["train"]), float(second["warmup"])
    ext2, ext1 = float(second.get("features", 0.0)), float(first.get("features", 0.0))
    budget = cfg.budget_steps * full + ext2
    w = max(1, int(round(cfg.warmup_fraction * budget / warm)))
    foundation = w * warm + ext1
    steps = {"repa": cfg.budget_steps, "reuse": cfg.budget_steps,
             "erw": int(round((budget - ext2 - w * warm) / full)),
             "reuse-charged": int(round((budget - ext2 - foundation) / full))}
    if min(steps.values()) < 1:
        raise ValueError(f"--budget-steps {cfg.budget_steps} does not cover the warmup ({w} steps) and one full step; "
                         "raise --budget-steps or lower --warmup-fraction")
    charged = {a: ext2 + steps[a] * full + (w * warm if a == "erw" else foundation if a == "reuse-charged" else 0.0)
               for a in ARMS}
    return ReusePlan(dict(full=full, warmup=warm, features_first=ext1, features_second=ext2), budget, w, steps,
                     charged)


def print_plan(p: ReusePlan):
    f = p.flops
    say(f"FLOPs per step: full {f['full'] / 1e9:.2f} G, warmup {f['warmup'] / 1e9:.2f} G; feature extraction "
        f"{f['features_first'] / 1e9:.2f} G (first task), {f['features_second'] / 1e9:.2f} G (second); budget "
        f"{p.budget / 1e12:.3f} TFLOP per arm; foundation: {p.warmup_steps} warmup steps")
    for a in ARMS:
        say(f"  {a:14s} {p.steps[a]:5d} full steps, {p.charged[a] / 1e12:.3f} TFLOP counted")


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------
def run_dir(cfg: ReuseConfig, name: str, seed: int) -> str:
    return os.path.join(cfg.out, f"{name}-seed{seed}")


def foundation_checkpoint(cfg: ReuseConfig, p: ReusePlan, seed: int) -> str:
    from ..engine.checkpoint import checkpoint_path

    return checkpoint_path(run_dir(cfg, "foundation", seed), p.warmup_steps)


def _job(cfg: ReuseConfig, p: ReusePlan, name: str, seed: int) -> dict:
    """Train one run (unless ``done.json`` says it is done) and evaluate its final checkpoint."""
    from ..engine import train
    from ..engine.checkpoint import folder_holds_run

    out, threads = run_dir(cfg, name, seed), cfg.threads or max(1, cores() // cfg.jobs)
    torch.set_num_threads(threads)
    common = dict(out=out, seed=seed, threads=threads, progress=False, samples_per_class=1)
    if name == "foundation":
        tc = train_config(cfg, "erw", cfg.first, warmup_steps=p.warmup_steps, steps=0, **common)
    elif name in ("reuse", "reuse-charged"):
        tc = train_config(cfg, "erw", cfg.second, warmup_from=foundation_checkpoint(cfg, p, seed), steps=p.steps[name],
                          **common)
    else:
        tc = train_config(cfg, name, cfg.second, steps=p.steps[name],
                          warmup_steps=p.warmup_steps if name == "erw" else None, **common)
    done = os.path.join(out, "done.json")
    if not os.path.exists(done):
        if folder_holds_run(out):  # an unfinished run: start it over (they are short)
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            res = train(tc)
        if res.status != "finished":
            raise StudyError(f"{out}: training ended with status {res.status!r} (see {out}/train.log)")
        with open(done, "w") as f:
            json.dump(dict(steps=res.steps, checkpoint=res.checkpoint, wall_seconds=time.time() - t0,
                           threads=threads), f)
    return {} if name == "foundation" else evaluate(cfg, p, name, seed)


def evaluate(cfg: ReuseConfig, p: ReusePlan, name: str, seed: int) -> dict:
    """FID and accuracy of the run's final checkpoint (kept in ``eval.json``)."""
    from .execute import evaluate_checkpoint

    out = run_dir(cfg, name, seed)
    path = os.path.join(out, "eval.json")
    if os.path.exists(path):
        return json.load(open(path))
    done = json.load(open(os.path.join(out, "done.json")))
    t0 = time.time()
    ev = evaluate_checkpoint(cfg, done["checkpoint"])  # the reference: the run's own digits (5-9)
    rec = dict(arm=name, seed=seed, steps=p.steps[name], flops=p.charged[name], fid=ev["fid"],
               accuracy=ev["accuracy"], train_seconds=done["wall_seconds"], eval_seconds=time.time() - t0)
    with open(path, "w") as f:
        json.dump(rec, f)
    return rec


def _pool(cfg: ReuseConfig, p: ReusePlan, jobs: List[Tuple[str, int]]) -> List[dict]:
    if cfg.jobs == 1 or len(jobs) <= 1:
        return [_job(cfg, p, n, s) for n, s in jobs]
    with stoppable_pool(cfg.jobs) as pool:  # Ctrl-C/SIGTERM stop the workers; they die with this process
        futures = [(n, s, pool.submit(_job, cfg, p, n, s)) for n, s in jobs]
        out = []
        for n, s, fut in futures:
            try:
                out.append(fut.result())
            except StudyStopped:  # a stop signal while waiting: the pool stops the workers
                raise
            except Exception as e:
                raise StudyError(f"{n} seed {s} failed ({type(e).__name__}: {e}); see "
                                 f"{run_dir(cfg, n, s)}/train.log; rerun the same command to continue") from e
            say(f"  {n} seed {s} done" + (f": FID {out[-1]['fid']:.2f}, accuracy {out[-1]['accuracy'] * 100:.1f}%"
                                          if out[-1] else ""))
        return out


def run_reuse_study(cfg: ReuseConfig, argv: Optional[List[str]] = None) -> dict:
    """Plan; write the settings; train the foundations, then every arm; evaluate; write the report."""
    from . import check_settings

    t0 = time.time()
    say("reuse study: counting FLOPs per step ...")
    p = plan(cfg)
    print_plan(p)
    if cfg.plan_only:
        return dict(plan=asdict(p))
    check_settings(cfg.out, {**settings(cfg), "plan": [p.warmup_steps, p.steps]})
    lock = RunLock(cfg.out, "reuse study").acquire(create=False)  # one study per folder
    try:
        return _run_and_report(cfg, p, argv, t0)
    finally:
        lock.release()


def _run_and_report(cfg: ReuseConfig, p: ReusePlan, argv: Optional[List[str]], t0: float) -> dict:
    say(f"reuse study: {len(cfg.seeds)} foundation(s), then {len(ARMS) * len(cfg.seeds)} runs, {cfg.jobs} at a time; "
        f"logs in {cfg.out}/<arm>-seed<seed>/train.log")
    _pool(cfg, p, [("foundation", s) for s in cfg.seeds])
    _pool(cfg, p, [(a, s) for s in cfg.seeds for a in ARMS])
    seeds = sorted({int(n.rpartition("-seed")[2]) for n in os.listdir(cfg.out) if n.startswith("foundation-seed")})
    results = [evaluate(cfg, p, a, s) for s in seeds for a in ARMS
               if os.path.exists(os.path.join(run_dir(cfg, a, s), "done.json"))]
    with open(os.path.join(cfg.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    command = " ".join(["python -m erw_fast.reuse_study"] + [shlex.quote(a) for a in (argv or [])])
    doc = cfg.doc if cfg.doc is not None else os.path.join(cfg.out, "reuse.md")
    if doc:
        with open(doc, "w") as f:
            f.write(report(cfg, p, results, seeds, command, (time.time() - t0) / 60))
    say(f"reuse study done in {(time.time() - t0) / 60:.1f} min: {doc or '-'}")
    return dict(plan=asdict(p), results=results)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def _ms(values, scale=1.0, digits=2) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def report(cfg: ReuseConfig, p: ReusePlan, results: List[dict], seeds: List[int], command: str,
           minutes: float) -> str:
    """The markdown section: settings, plan, one row per arm (mean ± sample std over the seeds)."""
    st = settings(cfg)
    lines = ["## A reused foundation: warm up on the digits 0–4, train on 5–9", "",
             f"Settings (written to `{cfg.out}/settings.json` before the first run): `{st['model']}`, target encoder "
             f"`{st['encoder']}` (features {st['features']}), batch {st['batch_size']}, lr {st['lr']:g}, EMA "
             f"{st['ema_decay']}, warmup region L = {st['l2r_depth']}, alignment at block {st['encoder_depth']}, λ0 "
             f"{st['lambda0']:g} (half-life {st['half_life']:g} steps), RoPE on — every arm, REPA's included, has ERW's "
             f"architecture on purpose (a controlled comparison; `--method repa` alone would train REPA's own recipe); first task `{cfg.first}`, second task "
             f"`{cfg.second}`; budget {cfg.budget_steps} REPA steps + the 5–9 feature extraction = "
             f"{p.budget / 1e12:.3f} TFLOP per arm; foundation and the `erw` arm: {p.warmup_steps} warmup steps "
             f"({cfg.warmup_fraction * 100:g}% of the budget); evaluation: {cfg.num_samples} samples of the final EMA "
             f"model ({cfg.sampler}, {cfg.sample_steps} steps, guidance {cfg.cfg_scale:g}), FID against the "
             f"{cfg.second} images in the digits classifier's feature space, accuracy = the share that classifier "
             f"reads as the requested digit. Seeds: {', '.join(map(str, seeds))}.", "",
             "| arm | full steps | second-task compute (TFLOP, as counted) | incl. the foundation (TFLOP) | FID ↓ | "
             "accuracy ↑ | train s |", "|---|---|---|---|---|---|---|"]
    found = p.warmup_steps * p.flops["warmup"] + p.flops["features_first"]
    for a in ARMS:
        rs = [r for r in results if r["arm"] == a]
        if not rs:
            continue
        total = p.charged[a] + (found if a == "reuse" else 0.0)
        lines.append(f"| {LABELS[a]} | {p.steps[a]} | {p.charged[a] / 1e12:.3f} | {total / 1e12:.3f} | "
                     f"{_ms([r['fid'] for r in rs])} | "
                     f"{_ms([r['accuracy'] for r in rs], 100, 1)}% | {_ms([r['train_seconds'] for r in rs], 1, 0)} |")
    lines += ["", f"Mean ± sample standard deviation over {len(seeds)} seed(s); {minutes:.1f} min for this call on "
              f"{cores()} core(s). Rerun (more seeds go into the same folder, the report covers all):", "",
              "```", command, "```", ""]
    return "\n".join(lines)

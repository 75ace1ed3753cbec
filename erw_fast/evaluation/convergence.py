"""The convergence study behind ``python -m erw_fast.convergence``: equal-compute planning, training
and evaluating the runs, the compute ratios, and the report (markdown + PNG plot).

See ``erw_fast/convergence.py`` (the command line) for what the study does and writes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

METHODS = ("vanilla", "repa", "erw")
# controls: runs that separate ERW's ingredients. erw-nowarmup = ERW's decaying λ without the warmup
# (REPA's loss with ERW's schedule), so ERW vs erw-nowarmup isolates the warmup + transfer.
CONTROLS = ("erw-nowarmup",)
ALL_METHODS = METHODS + CONTROLS
COLORS = {"vanilla": "#7f7f7f", "repa": "#1f77b4", "erw": "#d62728", "erw-nowarmup": "#ff7f0e"}
LABELS = {"vanilla": "SiT (vanilla)", "repa": "REPA", "erw": "ERW (warmup counted)",
          "erw-nowarmup": "ERW λ, no warmup (control)"}
NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"


DOCS_DOC, DOCS_PLOT = "docs/convergence.md", "docs/images/convergence.png"


class StudyError(RuntimeError):
    """A study run that did not finish (the command line reports it in one line)."""


@dataclass
class StudyConfig:
    out: str = "runs/convergence"
    doc: Optional[str] = None        # None: <out>/convergence.md ('' = none)
    plot: Optional[str] = None       # None: <out>/convergence.png ('' = none)
    update_docs: bool = False        # write the repository's docs/convergence.md and its plot instead
    methods: Tuple[str, ...] = METHODS
    seeds: Tuple[int, ...] = (0, 1, 2)
    budget_steps: int = 600          # the compute budget, in REPA steps of the default model and batch
    points: int = 5                  # evaluations at budget * i / points, i = 1..points
    warmup_steps: Optional[int] = None   # ERW warmup steps (None: the trainer's default)
    model: Optional[str] = None      # None: the digits default
    num_samples: int = 400
    sampler: str = "sde"
    sample_steps: int = 25
    cfg_scale: float = 1.0
    eval_seed: int = 12345
    eval_batch: int = 100
    threads: Optional[int] = None
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Planning: equal FLOPs
# --------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    method: str
    warmup_steps: int
    steps: int                       # phase-2 (full) steps
    eval_steps: List[int] = field(default_factory=list)     # total steps (warmup included)
    eval_fractions: List[float] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


def step_flops_of(flops: Dict[str, float], method: str) -> Tuple[float, float]:
    """(FLOPs of a warmup step, FLOPs of a full step) for ``method``."""
    if method == "vanilla":
        return 0.0, flops["vanilla"]
    return (flops["warmup"] if method == "erw" else 0.0), flops["full"]


def compute_at(flops: Dict[str, float], plan: RunPlan, total_step: int) -> float:
    """Training FLOPs spent by ``plan``'s run after ``total_step`` steps (warmup counted)."""
    fw, ff = step_flops_of(flops, plan.method)
    w = min(total_step, plan.warmup_steps)
    return w * fw + max(0, total_step - plan.warmup_steps) * ff


def plan_runs(flops: Dict[str, float], budget_steps: int, points: int, warmup_steps: int,
              methods: Sequence[str] = ALL_METHODS) -> Tuple[float, Dict[str, RunPlan]]:
    """Step counts that give every method the compute of ``budget_steps`` REPA steps, and the total
    step at which each method is evaluated (``points`` equal fractions of the budget)."""
    if budget_steps < 1 or points < 1:
        raise ValueError(f"--budget-steps and --points must be >= 1, got {budget_steps} and {points}")
    budget = budget_steps * flops["full"]
    plans = {}
    for m in methods:
        fw, ff = step_flops_of(flops, m)
        w = warmup_steps if m == "erw" else 0
        rest = budget - w * fw
        steps = int(round(rest / ff))
        if steps < 1:
            raise ValueError(f"the budget of {budget_steps} REPA steps ({budget:.3g} FLOPs) does not cover ERW's "
                             f"{w} warmup steps ({w * fw:.3g} FLOPs); raise --budget-steps or lower --warmup-steps")
        plan = RunPlan(m, w, steps)
        for i in range(1, points + 1):
            q = i / points
            left = q * budget - w * fw
            if left < ff * 0.5:  # this fraction of the budget falls inside ERW's warmup
                continue
            k = w + max(1, int(round(left / ff))) if i < points else w + steps
            if k not in plan.eval_steps:
                plan.eval_steps.append(k)
                plan.eval_fractions.append(q)
        plans[m] = plan
    return budget, plans


def probe_flops(model: Optional[str] = None, threads: Optional[int] = None) -> Dict[str, float]:
    """FLOPs per step of a vanilla step, an ERW warmup step and a full REPA/ERW step, counted as the
    trainer counts them (``erw_fast.engine.build.measure_step_flops``), without training."""
    from ..engine import TrainConfig
    from ..engine.build import measure_step_flops

    vanilla = measure_step_flops(TrainConfig(method="vanilla", model=model, threads=threads))
    erw = measure_step_flops(TrainConfig(method="erw", model=model, threads=threads))
    return {"vanilla": float(vanilla["train"]), "full": float(erw["train"]), "warmup": float(erw["warmup"])}


# --------------------------------------------------------------------------------------------
# Curves and ratios
# --------------------------------------------------------------------------------------------
def crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> Tuple[Optional[float], str]:
    """The first x at which the curve (xs, ys) reaches ``ys <= target``, linearly interpolated between
    evaluation points. Returns (x, "interpolated"), (xs[0], "at_first") when the first point is already
    there (the true crossing is at or before it), or (None, "not_reached")."""
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


def curves(results: List[dict], method: str, seed: int) -> List[dict]:
    return sorted((r for r in results if r["method"] == method and r["seed"] == seed), key=lambda r: r["step"])


def compute_ratios(results: List[dict], budget: float, seeds: Sequence[int], method: str, reference: str,
                   target_of: str) -> List[dict]:
    """Per seed: the fraction of the budget that ``method`` needs to reach ``target_of``'s final FID
    (same seed), in FLOPs and in seconds (over ``reference``'s total seconds)."""
    rows = []
    for s in seeds:
        c, t, ref = curves(results, method, s), curves(results, target_of, s), curves(results, reference, s)
        if not c or not t or not ref:
            continue
        target = t[-1]["fid"]
        x, kind = crossing([r["flops"] for r in c], [r["fid"] for r in c], target)
        sec, _ = crossing([r["seconds"] for r in c], [r["fid"] for r in c], target)
        rows.append(dict(seed=s, target_fid=target, kind=kind, flops=x, ratio=(x / budget if x is not None else None),
                         seconds_ratio=(sec / ref[-1]["seconds"] if sec is not None else None)))
    return rows


def format_ratio(rows: List[dict], key: str = "ratio") -> str:
    if not rows:
        return "n/a"
    vals = [r[key] for r in rows]
    parts = []
    for r, v in zip(rows, vals):
        if v is None:
            parts.append(f"seed {r['seed']}: not reached")
        else:
            parts.append(f"seed {r['seed']}: {'≤ ' if r['kind'] == 'at_first' else ''}{v:.2f}")
    if all(v is not None for v in vals):
        m, s = mean_std(vals)
        bound = any(r["kind"] == "at_first" for r in rows)
        head = f"**{m:.2f} ± {s:.2f}**" + (" (an upper bound: some seeds were already there at their first evaluation)" if bound else "")
    else:
        reached = sum(v is not None for v in vals)
        head = f"**not reached within the budget in {len(vals) - reached} of {len(vals)} seeds**"
    return f"{head} ({'; '.join(parts)})"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def run_dir(cfg: StudyConfig, method: str, seed: int) -> str:
    return os.path.join(cfg.out, f"{method}-seed{seed}")


def train_run(cfg: StudyConfig, plan: RunPlan, seed: int) -> str:
    """Train one run (or resume an unfinished one); returns its folder."""
    from ..engine import TrainConfig, train
    from ..engine.checkpoint import folder_holds_run
    from ..models.checkpoint import list_checkpoints

    out = run_dir(cfg, plan.method, seed)
    done = os.path.join(out, "done.json")
    if os.path.exists(done):
        return out
    resume = bool(list_checkpoints(out))
    if not resume and folder_holds_run(out):  # killed before its first checkpoint: start it over
        shutil.rmtree(out)
    method = plan.method  # the control erw-nowarmup is a recipe of the trainer too
    tc = TrainConfig(method=method, model=cfg.model, out=out, seed=seed, steps=plan.steps,
                     warmup_steps=plan.warmup_steps if method == "erw" else None,
                     ckpt_at=tuple(plan.eval_steps), samples_per_class=1, threads=cfg.threads,
                     progress=cfg.progress, resume="auto" if resume else None)
    t0 = time.time()
    res = train(tc)
    if res.status != "finished":
        raise StudyError(f"{out}: training ended with status {res.status!r}; run the same command again to "
                           "resume it (finished runs and evaluations are kept)")
    with open(done, "w") as f:
        json.dump({"summary": res.summary, "steps": res.steps, "wall_seconds": time.time() - t0}, f, default=str)
    return out


def evaluate_checkpoint(cfg: StudyConfig, path: str, ref_stats) -> dict:
    from ..metrics import (classifier_accuracy, compute_features, feature_stats, frechet_distance,
                          get_feature_network)
    from ..engine.checkpoint import read_training_checkpoint
    from ..models.checkpoint import load_checkpoint
    from ..sampling.generate import generate

    ckpt = read_training_checkpoint(path)
    model = load_checkpoint(ckpt, which="ema").eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    arr, labels = generate(model, range(cfg.num_samples), shape, list(range(model.num_classes)), seed=cfg.eval_seed,
                           sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                           batch_size=cfg.eval_batch)
    net = get_feature_network("digits")
    mu, sigma = feature_stats(compute_features(arr, net))
    wc = ckpt.get("warmup_cost") or {}
    seconds = float(ckpt.get("phase_seconds", 0.0)) + (float(wc.get("seconds", 0.0)) if ckpt["phase"] == "train" else 0.0)
    return dict(fid=frechet_distance(mu, sigma, *ref_stats), accuracy=classifier_accuracy(arr, labels, net),
                seconds=seconds)


def data_floor(cfg: StudyConfig, ref_stats, repeats: int = 3) -> Tuple[float, float]:
    """FID of ``num_samples`` real digits (random subsets) against the reference: the best a model can
    score with this many samples."""
    from ..data.digits import load_digits
    from ..metrics import compute_features, feature_stats, frechet_distance, get_feature_network
    from ..utils.images import to_uint8

    images, _ = load_digits()
    net = get_feature_network("digits")
    g = np.random.default_rng(cfg.eval_seed)
    vals = []
    for _ in range(repeats):
        idx = g.choice(len(images), size=min(cfg.num_samples, len(images)), replace=False)
        arr = to_uint8(images[torch.as_tensor(idx)]).transpose(0, 2, 3, 1)
        vals.append(frechet_distance(*feature_stats(compute_features(arr, net)), *ref_stats))
    return mean_std(vals)


def read_results(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_losses(folder: str, tail: float = 0.1) -> dict:
    """Mean velocity and alignment loss over the last ``tail`` of the full-training log records."""
    recs = [r for r in read_results(os.path.join(folder, "metrics.jsonl")) if r.get("phase") == "train" and "loss" in r]
    if not recs:
        return {}
    recs = recs[-max(1, int(len(recs) * tail)):]
    return dict(velocity=float(np.mean([r["loss_velocity"] for r in recs])),
                align=float(np.mean([r["loss_align"] for r in recs])))


def study_settings(cfg: StudyConfig, warmup: int) -> dict:
    """What the runs and evaluations in ``cfg.out`` depend on (a rerun must match it)."""
    return dict(model=cfg.model, budget_steps=cfg.budget_steps, points=cfg.points, warmup_steps=warmup,
                num_samples=cfg.num_samples, sampler=cfg.sampler, sample_steps=cfg.sample_steps,
                cfg_scale=cfg.cfg_scale, eval_seed=cfg.eval_seed)


def check_settings(out: str, settings: dict):
    """Write ``out/settings.json`` on the first run; refuse a rerun whose settings differ."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a study made with other settings ({what}); its runs and FIDs cannot be "
                             "mixed with these. Use another --out (and --doc/--plot), or the same settings")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def lambda_schedules(model: Optional[str]) -> Dict[str, str]:
    """How each study method weighs the alignment loss (from the trainer's defaults)."""
    from ..engine.config import TrainConfig, resolve_config

    out = {}
    for m in ALL_METHODS:
        c = resolve_config(TrainConfig(method=m, model=model))
        if m == "vanilla":
            out[m] = "none"
        elif c.lambda_schedule == "constant":
            out[m] = f"constant {c.lambda0:g}"
        elif c.lambda_schedule == "halflife":
            out[m] = f"{c.lambda0:g}·2^(−k/{c.half_life:g}), k = full-training step"
        else:
            out[m] = f"{c.lambda_schedule} from {c.lambda0:g}"
    return out


def _append_command(out: str, command: str) -> List[str]:
    path = os.path.join(out, "commands.json")
    cmds = json.load(open(path)) if os.path.exists(path) else []
    if command not in cmds:
        cmds.append(command)
        with open(path, "w") as f:
            json.dump(cmds, f, indent=1)
    return cmds


def report_paths(cfg: StudyConfig) -> Tuple[str, str]:
    """(doc, plot): given paths win; else the repository's docs with ``update_docs``; else in ``out``."""
    doc = cfg.doc if cfg.doc is not None else (DOCS_DOC if cfg.update_docs else os.path.join(cfg.out, "convergence.md"))
    plot = cfg.plot if cfg.plot is not None else (DOCS_PLOT if cfg.update_docs else
                                                  os.path.join(cfg.out, "convergence.png"))
    return doc, plot


def run_study(cfg: StudyConfig, argv: Optional[List[str]] = None) -> dict:
    from ..engine.checkpoint import checkpoint_path
    from ..engine.config import TrainConfig, resolve_config
    from ..metrics import digits_reference_stats

    if not cfg.methods or cfg.methods != tuple(m for m in ALL_METHODS if m in cfg.methods):
        raise ValueError(f"--methods must be a subset of {','.join(ALL_METHODS)} in that order, got {cfg.methods}")
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 for FID, got {cfg.num_samples}")
    cfg = replace(cfg, doc=report_paths(cfg)[0], plot=report_paths(cfg)[1])
    if cfg.plot:
        _require_matplotlib()
    t_start = time.time()
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else \
        resolve_config(TrainConfig(method="erw", model=cfg.model)).warmup_steps
    os.makedirs(cfg.out, exist_ok=True)
    check_settings(cfg.out, study_settings(cfg, warmup))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    say("convergence study: counting FLOPs per step ...")
    flops = probe_flops(cfg.model, cfg.threads)
    budget, plans = plan_runs(flops, cfg.budget_steps, cfg.points, warmup)
    for m in cfg.methods:
        p = plans[m]
        say(f"  {m:12s}: {p.warmup_steps} warmup + {p.steps} full steps; evaluated at total steps {p.eval_steps}")
    results_path = os.path.join(cfg.out, "results.jsonl")
    have = {(r["method"], r["seed"], r["step"]) for r in read_results(results_path)}
    ref_stats = digits_reference_stats()
    runs = [(s, m) for s in cfg.seeds for m in cfg.methods]
    for i, (seed, m) in enumerate(runs):
        plan = plans[m]
        say(f"[{i + 1}/{len(runs)}] {m} seed {seed}: training {plan.warmup_steps} + {plan.steps} steps "
            f"({(time.time() - t_start) / 60:.1f} min so far)")
        folder = train_run(cfg, plan, seed)
        for k in [k for k in plan.eval_steps if (m, seed, k) not in have]:
            t0 = time.time()
            ev = evaluate_checkpoint(cfg, checkpoint_path(folder, k), ref_stats)
            rec = dict(method=m, seed=seed, step=k, fraction=plan.eval_fractions[plan.eval_steps.index(k)],
                       flops=compute_at(flops, plan, k), **ev, eval_seconds=time.time() - t0)
            with open(results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"    step {k}: FID {ev['fid']:.2f}, accuracy {ev['accuracy'] * 100:.1f}% "
                f"({rec['eval_seconds']:.0f} s to evaluate)")
    # the report covers every method and seed evaluated in this folder (e.g. a control added later)
    results = [r for r in read_results(results_path) if r["method"] in plans and r["step"] in plans[r["method"]].eval_steps]
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in results)]
    seeds = sorted({r["seed"] for r in results})
    finals = [r for r in results if r["step"] == plans[r["method"]].total_steps]
    losses = {m: {s: final_losses(run_dir(cfg, m, s)) for s in seeds} for m in methods}
    command = " ".join(["python -m erw_fast.convergence"] + [shlex.quote(a) for a in (argv or [])])
    study = dict(config=asdict(cfg), settings=study_settings(cfg, warmup), flops=flops, budget=budget,
                 plans={m: asdict(plans[m]) for m in methods}, methods=methods, seeds=seeds,
                 schedules=lambda_schedules(cfg.model), floor=data_floor(cfg, ref_stats), losses=losses,
                 minutes=(time.time() - t_start) / 60, train_minutes=sum(r["seconds"] for r in finals) / 60,
                 eval_minutes=sum(r.get("eval_seconds", 0.0) for r in results) / 60,
                 commands=_append_command(cfg.out, command),
                 machine=dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                              torch=torch.__version__, python=platform.python_version()))
    with open(os.path.join(cfg.out, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    if cfg.plot:
        write_plot(cfg.plot, results, study)
    if cfg.doc:
        write_doc(cfg.doc, results, study)
    say(f"convergence study done in {(time.time() - t_start) / 60:.1f} min: {cfg.doc or '-'}, {cfg.plot or '-'}")
    return dict(study=study, results=results)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the convergence plot needs matplotlib: pip install -e '.[study]' (or pass --plot '' to skip "
                         "the plot)") from None


def _by_fraction(results: List[dict], method: str) -> Dict[float, List[dict]]:
    out: Dict[float, List[dict]] = {}
    for r in results:
        if r["method"] == method:
            out.setdefault(round(r["fraction"], 6), []).append(r)
    return dict(sorted(out.items()))


def write_plot(path: str, results: List[dict], study: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import matplotlib.transforms

    methods = list(study["plans"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for m in methods:
        groups = _by_fraction(results, m)
        if not groups:
            continue
        x = np.array([np.mean([r["flops"] for r in g]) for g in groups.values()]) / 1e12
        for ax, key, scale in ((axes[0], "fid", 1.0), (axes[1], "accuracy", 100.0)):
            vals = [np.array([r[key] for r in g]) * scale for g in groups.values()]
            mean = np.array([v.mean() for v in vals])
            ax.plot(x, mean, "-o", color=COLORS[m], label=f"{LABELS[m]} ({len(next(iter(groups.values())))} seeds)", ms=4)
            if max(len(v) for v in vals) > 1:
                ax.fill_between(x, [v.min() for v in vals], [v.max() for v in vals], color=COLORS[m], alpha=0.15, lw=0)
    erw = study["plans"].get("erw")
    if erw:
        w_flops = erw["warmup_steps"] * study["flops"]["warmup"] / 1e12
        for ax in axes:
            ax.axvline(w_flops, color=COLORS["erw"], ls=":", lw=1)
            ax.text(w_flops, 0.02, " ERW warmup ends", color=COLORS["erw"], fontsize=8,
                    transform=matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes))
    floor = study["floor"][0]
    c = study["config"]
    axes[0].set(xlabel="training compute (TFLOP, warmup included)",
                ylabel=f"FID (digits features, n={c['num_samples']}; real digits: {floor:.2f})",
                title="FID vs training compute (lower is better)")
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set(xlabel="training compute (TFLOP, warmup included)", ylabel="classifier accuracy (%)",
                title="samples read as the requested digit")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{c['budget_steps']} REPA steps of compute; mean over seeds, band = min–max; "
                 f"{c['sampler']} {c['sample_steps']} steps, cfg {c['cfg_scale']:g}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pm(vals: Sequence[float], fmt: str = "{:.2f}") -> str:
    m, s = mean_std(vals)
    return (fmt.format(m) + " ± " + fmt.format(s)) if len(vals) > 1 else fmt.format(m)


def _keep_notes(path: str) -> str:
    if os.path.exists(path):
        text = open(path, encoding="utf-8").read()
        if NOTES_START in text and NOTES_END in text:
            return text[text.index(NOTES_START):text.index(NOTES_END) + len(NOTES_END)]
    return f"{NOTES_START}\n_(no notes yet)_\n{NOTES_END}"


def write_doc(path: str, results: List[dict], study: dict) -> str:
    c, plans, flops, budget = study["config"], study["plans"], study["flops"], study["budget"]
    methods, seeds, st = study["methods"], study["seeds"], study["settings"]
    L = ["# Convergence: vanilla SiT vs REPA vs ERW at equal training compute\n",
         "Written by `python -m erw_fast.convergence` (the numbers, tables and plot); the notes section is "
         "written by hand and kept when the study is rerun. The commands that produced this folder's runs:\n",
         "```bash\n" + "\n".join(study["commands"]) + "\n```\n"]
    m = study["machine"]
    L.append(f"Training took {study['train_minutes']:.1f} min and evaluation {study['eval_minutes']:.1f} min in all, "
             f"on {m['threads']} CPU threads ({m['cpu']}), torch {m['torch']}, Python {m['python']}. A rerun skips "
             f"finished runs and evaluations; the last invocation took {study['minutes']:.1f} min.\n")
    L.append("## Setup\n")
    L.append(f"- Same model (`{st['model'] or 'SiT-D/2'}`), data (1,797 embedded digits, 16×16), batch, lr, EMA and "
             "training seeds for every method. The methods differ in the alignment loss and its weight λ, and in "
             "ERW's warmup (blocks 0..L−1 trained alone, then transferred with a fresh optimizer and EMA).")
    L.append(f"- Budget: the compute of {st['budget_steps']} REPA steps = **{budget / 1e12:.2f} TFLOP** per run, counted "
             "with `torch.utils.flop_counter` (forward + backward + frozen target encoder) exactly as the trainer "
             "logs it.\n")
    L += ["| method | λ | FLOPs per step | warmup steps | full steps | evaluated at total steps |",
          "|---|---|---|---|---|---|"]
    for mm in methods:
        p = plans[mm]
        fw, ff = step_flops_of(flops, mm)
        per = f"{ff / 1e9:.2f} GFLOP" + (f" (warmup step {fw / 1e9:.2f} GFLOP)" if fw else "")
        L.append(f"| {LABELS[mm]} | {study['schedules'][mm]} | {per} | {p['warmup_steps']} | {p['steps']} | "
                 f"{', '.join(map(str, p['eval_steps']))} |")
    L.append("")
    L.append(f"- Evaluation: EMA weights, {st['num_samples']} samples per checkpoint ({st['sampler']}, "
             f"{st['sample_steps']} steps, guidance {st['cfg_scale']:g}, the same per-index noise and balanced classes "
             "for every checkpoint). FID is against all 1,797 digits in the feature space of the project's digits "
             "classifier, and accuracy is the fraction of samples it reads as the requested digit. The classifier is "
             "not the target encoder (other architecture, objective and weights), but both were trained with labels "
             "on the same split, so alignment to the encoder can carry class information that the classifier "
             "rewards, the accuracy most of all.")
    fl, fs = study["floor"]
    L.append(f"- Floor: {st['num_samples']} *real* digits score FID {fl:.2f} ± {fs:.2f} against the same reference "
             "(small-sample bias); no model can do much better than that.\n")
    if c["plot"]:
        rel = os.path.relpath(c["plot"], os.path.dirname(os.path.abspath(path)) or ".")
        L.append(f"![FID and accuracy against training compute]({rel})\n")
    L.append("## Results (mean ± std over seeds " + ", ".join(map(str, seeds)) + ")\n")
    fracs = sorted({round(r["fraction"], 6) for r in results})
    L += ["| compute | " + " | ".join(f"{LABELS[mm]} FID" for mm in methods) + " | " +
          " | ".join(f"{LABELS[mm]} acc. %" for mm in methods) + " |", "|" + "---|" * (1 + 2 * len(methods))]
    for q in fracs:
        cells_f, cells_a = [], []
        for mm in methods:
            g = [r for r in results if r["method"] == mm and round(r["fraction"], 6) == q]
            cells_f.append(_pm([r["fid"] for r in g]) if g else "(warmup)")
            cells_a.append(_pm([r["accuracy"] * 100 for r in g], "{:.1f}") if g else "(warmup)")
        L.append(f"| {q * 100:.0f}% ({q * budget / 1e12:.2f} TFLOP) | " + " | ".join(cells_f) + " | " + " | ".join(cells_a) + " |")
    L.append("")
    secs = {mm: [r["seconds"] for r in results if r["method"] == mm and r["step"] == plans[mm]["warmup_steps"] + plans[mm]["steps"]]
            for mm in methods}
    L.append("Wall clock of a whole run (training only, warmup included): " + "; ".join(
        f"{LABELS[mm]} {_pm(v, '{:.0f}')} s" for mm, v in secs.items() if v) + ".\n")
    L.append("## How much compute each method needs to reach another's final FID\n")
    L += ["| method | to reach, same seed | fraction of REPA's FLOPs (warmup included) | fraction of REPA's seconds |",
          "|---|---|---|---|"]
    pairs = [("erw", "repa"), ("erw", "vanilla"), ("repa", "vanilla"), ("erw-nowarmup", "repa"), ("erw", "erw-nowarmup")]
    for who, tgt in pairs:
        if who in methods and tgt in methods and "repa" in methods:
            rr = compute_ratios(results, budget, seeds, who, "repa", tgt)
            L.append(f"| {LABELS[who]} | {LABELS[tgt]}'s final FID | {format_ratio(rr)} | {format_ratio(rr, 'seconds_ratio')} |")
    L.append("\nEvery run has the same FLOP budget, so a fraction below 1 means fewer FLOPs than REPA spent in total. "
             "Ratios interpolate linearly between evaluation points; \"≤\" marks seeds that were already there at "
             "their first evaluation, \"not reached\" seeds that never got there within the budget.\n")
    L.append("## Per seed (final checkpoint)\n")
    L += ["| method | seed | FID | accuracy % | seconds | final velocity loss | final alignment loss |",
          "|---|---|---|---|---|---|---|"]
    for mm in methods:
        for s in seeds:
            cv = curves(results, mm, s)
            if not cv:
                continue
            lo = study["losses"].get(mm, {}).get(s) or study["losses"].get(mm, {}).get(str(s)) or {}
            al = f"{lo['align']:.3f}" if lo and mm != "vanilla" else "–"
            L.append(f"| {LABELS[mm]} | {s} | {cv[-1]['fid']:.2f} | {cv[-1]['accuracy'] * 100:.1f} | "
                     f"{cv[-1]['seconds']:.0f} | {lo.get('velocity', float('nan')):.4f} | {al} |")
    L.append("\nLosses: mean of the single-batch values logged in the last 10% of full training (every 10th step).\n")
    L.append("## Notes\n")
    L.append(_keep_notes(path))
    L.append("")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    return path

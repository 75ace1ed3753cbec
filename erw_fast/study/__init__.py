"""The convergence study behind ``python -m erw_fast.convergence``: vanilla SiT, REPA and ERW (a sweep
of warmup lengths, the alignment stop, the no-warmup control) at equal training compute, warmup and
feature extraction counted, at the proportions of the ERW paper's SiT-XL/2 setting.

``config`` (settings, presets, arms), ``plan`` (equal-compute step counts, evaluation points, curve
arithmetic), ``execute`` (FLOP probe, training and evaluating the runs, ``jobs`` at a time), ``report``
(markdown + plot). See ``erw_fast/convergence.py`` for what the command does and writes.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.runlock import RunLock
from .config import Arm, StudyConfig, check_config, selected_arms, study_arms, study_config, study_settings
from .execute import (Job, StudyError, collect_fits, collect_results, cores, data_floor, final_losses, probe_flops,
                      read_jsonl, run_conditions, run_dir, run_jobs, say, seeds_in, train_config)
from .plan import TARGET_QUANTILES, RunPlan, compute_at, compute_ratios, crossing, fid_targets, mean_std, plan_runs

__all__ = ["Arm", "RunPlan", "StudyConfig", "StudyError", "compute_at", "compute_ratios", "crossing", "plan_runs",
           "run_study", "study_arms", "study_config"]

EPOCHS_NOTE = 200  # an image folder the budget passes more often than this gets a note (the digits: ~14)
DOCS_DOC, DOCS_PLOT = "docs/convergence.md", "docs/images/convergence.png"


def repository_root() -> str:
    """The checkout this package was installed from (``pip install -e``), for ``--update-docs``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not (os.path.isfile(os.path.join(root, DOCS_DOC)) and os.path.isfile(os.path.join(root, "setup.py"))):
        raise ValueError(f"--update-docs writes the repository's {DOCS_DOC}, but erw_fast is not installed from a "
                         "checkout (pip install -e); give --doc and --plot instead")
    return root


def report_paths(cfg: StudyConfig) -> Tuple[str, str]:
    """(doc, plot): given paths win; else the repository's docs with ``update_docs``; else in ``out``."""
    if cfg.update_docs and cfg.quick and (cfg.doc is None or cfg.plot is None):
        raise ValueError("--update-docs with --quick would put smoke-test numbers into the repository's report; "
                         "leave one out, or give --doc and --plot")
    docs = (lambda rel: os.path.join(repository_root(), rel)) if cfg.update_docs else None
    doc = cfg.doc if cfg.doc is not None else (docs(DOCS_DOC) if docs else os.path.join(cfg.out, "convergence.md"))
    plot = cfg.plot if cfg.plot is not None else (docs(DOCS_PLOT) if docs else os.path.join(cfg.out, "convergence.png"))
    return doc, plot


def check_settings(out: str, settings: dict):
    """Write ``out/settings.json`` on the first run; refuse a rerun whose settings differ."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old.setdefault("encoder", "digits-cnn")  # folders from before --encoder: the only target then
        old.setdefault("data", "digits")  # folders from before --data: the digits study
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a study made with other settings ({what}); its runs and FIDs cannot be "
                             "mixed with these. Use another --out (and --doc/--plot), or the same settings")
    else:
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def describe_arms(cfg: StudyConfig, arms: List[Arm]) -> Dict[str, dict]:
    """Per arm: label, recipe, warmup share, stop, and how its λ is weighted (the trainer's defaults)."""
    from ..engine.config import resolve_config

    out = {}
    for a in arms:
        c = resolve_config(train_config(cfg, a.method))
        if a.method == "vanilla":
            lam = "none"
        elif c.lambda_schedule == "halflife":
            lam = f"{c.lambda0:g}·2^(−k/{c.half_life:g})"
        else:
            lam = f"{c.lambda_schedule} {c.lambda0:g}"
        if a.stop is not None:
            lam += f", 0 from {a.stop * 100:g}% of the budget"
        out[a.name] = dict(label=a.label, method=a.method, warmup=a.warmup, stop=a.stop, lam=lam)
    return out


def print_plan(flops: Dict[str, float], budget: float, plans: Dict[str, RunPlan]):
    say(f"FLOPs per step: full {flops['full'] / 1e9:.2f} G, warmup {flops['warmup'] / 1e9:.2f} G "
        f"({flops['warmup'] / flops['full'] * 100:.0f}% of full), vanilla {flops['vanilla'] / 1e9:.2f} G, after the "
        f"stop {flops['unaligned'] / 1e9:.2f} G; feature extraction {flops.get('features', 0) / 1e9:.2f} G once; "
        f"budget {budget / 1e12:.2f} TFLOP per arm")
    for name, p in plans.items():
        stop = f", alignment until phase-2 step {p.align_until}" if p.align_until is not None else ""
        say(f"  {name:16s} {p.warmup_steps:5d} warmup + {p.steps:4d} full steps{stop}; evaluated at {p.eval_steps}")


def describe_data(cfg: StudyConfig):
    """The data and its preset (an image folder or latents), and a note when the budget passes the data
    so often that the arms may be compared on memorising it."""
    from .config import data_kind, folder_data, folder_size, latent_run_settings, reference_indices

    n, fid = folder_size(cfg.data), ("the Inception file" if cfg.inception else
                                     "none (no --inception): the speed figure uses fd_" + cfg.encoder)
    if data_kind(cfg.data) == "latents":
        d, run = folder_data(cfg.data), latent_run_settings()
        grid = d.input_size // int(cfg.model.rsplit("/", 1)[1])
        say(f"data {cfg.data}: {n} latents {d.channels}x{d.input_size}x{d.input_size} of {d.image_size}-px images; "
            f"latent preset: model {cfg.model} ({grid}x{grid} tokens), batch {cfg.batch_size}, encoder features "
            f"{cfg.features}" + (" (stored by extract_features, their extraction charged)" if cfg.features ==
                                 "precomputed" else " (the encoder run on the stored images)") +
            f"; lr {run['lr']:g}, EMA {run['ema_decay']:g}, λ half-life {run['half_life']} (the digits preset's); "
            f"samples decoded with the dataset's VAE; FD reference: {len(reference_indices(cfg.data))} of its stored "
            f"images; FID: {fid}")
    else:
        say(f"data {cfg.data}: {n} images; preset model {cfg.model}, batch {cfg.batch_size}, "
            f"encoder features {cfg.features}; FID: {fid}")
    epochs = cfg.budget_steps * cfg.batch_size / n
    if epochs > EPOCHS_NOTE:
        where = "the folder's" if data_kind(cfg.data) == "imagefolder" else "the dataset's"
        say(f"note: the budget goes {epochs:.0f} times through {where} {n} images: the arms may be compared "
            "on memorising it; more images (or a lower --budget-steps) make the comparison mean more")


def _done(cfg: StudyConfig, jobs: List[Job]) -> set:
    return {(j.arm.name, j.seed) for j in jobs if os.path.exists(os.path.join(run_dir(cfg, j.arm.name, j.seed),
                                                                              "done.json"))}


def _run_logged(cfg: StudyConfig, jobs: List[Job], flops: Dict[str, float], argv: Optional[List[str]]):
    """``run_jobs``, and this call appended to ``out/invocations.jsonl`` (command, date, wall minutes, the
    runs it trained, how it ended) whether it finishes or not."""
    command = " ".join(["python -m erw_fast.convergence"] + [shlex.quote(a) for a in (argv or [])])
    before, t0, status = _done(cfg, jobs), time.time(), "failed"
    try:
        run_jobs(cfg, jobs, flops)
        status = "finished"
    finally:
        rec = dict(command=command, date=time.strftime("%Y-%m-%d"), minutes=(time.time() - t0) / 60,
                   trained=len(_done(cfg, jobs) - before), jobs=cfg.jobs, status=status)
        with open(os.path.join(cfg.out, "invocations.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


ENCODER_DESC = {
    "digits-ssl": "the embedded label-free encoder: SimCLR on the digits' training split, no label in its objective",
    "digits-cnn": "the embedded encoder trained with the digits' labels (cross-entropy) — the label-leak setting",
}
FIT_DESC = "aligned block, 256 held-out validation digits, t = 0, topk 10; erw_fast.evaluation.probe"


def target_rule(cfg: StudyConfig) -> str:
    if cfg.fid_targets:
        return "given with --fid-targets"
    qs = ", ".join(f"{q:g}" for q in TARGET_QUANTILES)
    return (f"the rule fixed before the run: the shares {qs} of the way from the worst to the best arm's mean final "
            "FID on a log scale, every arm counted alike")


def _study_record(cfg, flops, budget, plans, results, seeds) -> dict:
    from ..engine.config import resolve_config
    from ..metrics import fd_name
    from ..models.sit import SIZES

    from .config import data_kind

    arms = study_arms(cfg)
    where = "folder" if data_kind(cfg.data) != "latents" else "dataset"
    present = [a.name for a in arms if any(r["arm"] == a.name for r in results)]
    tc = resolve_config(train_config(cfg, "erw"))
    size = SIZES[cfg.model.removeprefix("SiT-").split("/")[0]]
    finals = [r for r in results if r["step"] == plans[r["arm"]].total_steps]
    metric = "fid" if all(r["fid"] is not None for r in results) else fd_name(cfg.encoder)
    final_fid = {n: mean_std([r[metric] for r in finals if r["arm"] == n])[0] for n in present}
    return dict(
        metric=metric, data=cfg.data, fid_network=("digits classifier" if cfg.data == "digits" else
                                                   ("Inception" if cfg.inception else None)),
        encoder=cfg.encoder, encoder_desc=ENCODER_DESC.get(cfg.encoder, (
            "DINOv2, self-supervised on LVD-142M without labels" if cfg.encoder.startswith("dinov2") else cfg.encoder)
            + (f"; weights from {cfg.encoder_path}" if cfg.encoder_path else "")), fd_key=fd_name(cfg.encoder),
        fid_targets=fid_targets(final_fid, cfg.fid_targets), target_rule=target_rule(cfg),
        fits=collect_fits(cfg, present, seeds),
        fit_desc=FIT_DESC if cfg.data == "digits" else FIT_DESC.replace("256 held-out validation digits",
                                                                         "up to 256 images of the " + where),
        config=asdict(cfg), settings=study_settings(cfg), flops=flops, budget=budget,
        plans={n: asdict(p) for n, p in plans.items()}, arms=describe_arms(cfg, arms), present=present, seeds=seeds,
        main_arms=[a.name for a in arms if a.name in present and not (a.method == "erw" and a.stop is None
                                                                          and a.warmup != cfg.stop_warmup)],
        sweep=[a.name for a in arms if a.method == "erw" and a.stop is None],
        l2r_depth=tc.l2r_depth, encoder_depth=tc.encoder_depth, rope=tc.rope, lambda0=tc.lambda0,
        model_desc=f"{size['depth']} blocks, {size['hidden_size']} wide, {size['num_heads']} heads",
        floor=data_floor(cfg), losses={n: {str(s): final_losses(run_dir(cfg, n, s)) for s in seeds} for n in present},
        train_minutes=sum(r["seconds"] for r in finals) / 60,
        eval_minutes=sum(r.get("eval_seconds", 0.0) for r in results) / 60,
        invocations=read_jsonl(os.path.join(cfg.out, "invocations.jsonl")),
        conditions=run_conditions(cfg, present, seeds),
        machine=dict(cpu=platform.processor() or platform.machine(), cores=cores(), torch=torch.__version__,
                     python=platform.python_version()))


def run_study(cfg: StudyConfig, argv: Optional[List[str]] = None) -> dict:
    """Plan, train and evaluate every selected arm and seed (resuming what ``out`` holds), then write
    ``results.jsonl``, ``study.json``, the report and the plot. ``plan_only``: print the plan, write nothing."""
    from .report import verdict, write_doc, write_plot

    check_config(cfg)
    doc, plot = report_paths(cfg)
    cfg = replace(cfg, doc=doc, plot=plot)
    if cfg.plot and not cfg.plan_only:
        _require_matplotlib()
    t_start = time.time()
    say("convergence study: counting FLOPs per step ...")
    flops = probe_flops(cfg)
    budget, plans = plan_runs(flops, cfg.budget_steps, cfg.points, study_arms(cfg))
    if cfg.data != "digits":
        describe_data(cfg)
    say(f"target encoder {cfg.encoder}; {cfg.points} evaluations per run ({cfg.num_samples} samples, {cfg.sampler} "
        f"{cfg.sample_steps} steps); seeds {', '.join(map(str, cfg.seeds))}")
    print_plan(flops, budget, plans)
    if cfg.plan_only:
        return dict(flops=flops, budget=budget, plans=plans)
    lock = RunLock(cfg.out, "convergence").acquire(create=False)  # one study per folder (each arm's run
    try:                                                          # folder is locked by train)
        return _run_and_report(cfg, flops, budget, plans, argv, t_start, lock)
    finally:
        lock.release()


def _run_and_report(cfg: StudyConfig, flops, budget, plans, argv, t_start, lock) -> dict:
    from .report import verdict, write_doc, write_plot

    check_settings(cfg.out, {**study_settings(cfg), "plans": {n: [p.warmup_steps, p.steps, p.align_until, p.eval_steps]
                                                              for n, p in plans.items()}})
    lock.acquire()  # a new folder: locked once its settings are written
    _run_logged(cfg, [Job(a, plans[a.name], s) for s in cfg.seeds for a in selected_arms(cfg)], flops, argv)
    seeds = seeds_in(cfg)
    results = collect_results(cfg, plans, seeds)
    with open(os.path.join(cfg.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    study = _study_record(cfg, flops, budget, plans, results, seeds)
    with open(os.path.join(cfg.out, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    if cfg.plot:
        write_plot(cfg.plot, results, study)
    if cfg.doc:
        write_doc(cfg.doc, results, study)
    say("verdict: " + verdict(results, study)["line"])
    say(f"convergence study done in {(time.time() - t_start) / 60:.1f} min: {cfg.doc or '-'}, {cfg.plot or '-'}")
    return dict(study=study, results=results)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the convergence plot needs matplotlib: pip install -e '.[study]' (or pass --plot '' to skip "
                         "the plot)") from None

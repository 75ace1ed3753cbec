"""Running the study: the FLOP probe, one arm's run (train, then evaluate its checkpoints), and the
runs of all arms and seeds, ``jobs`` at a time in worker processes.

Everything is resumable: a run folder with ``done.json`` is not trained again (an unfinished one is
resumed from its last checkpoint), and each evaluation is appended to the run's ``evals.jsonl`` as
soon as it is made, so a rerun evaluates only what is missing. A run's training output goes to its
``train.log``; the console gets one line per run and per evaluation.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.digits import is_digits
from .config import Arm, StudyConfig
from .plan import RunPlan, compute_at, mean_std


class StudyError(RuntimeError):
    """A study run that did not finish (the command line reports it in one line)."""


class StudyStopped(StudyError):
    """A stop signal (SIGTERM, SIGHUP, Ctrl-C): the runs under way were stopped, each with a checkpoint;
    the command exits 128+N."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {int(signum)}: the runs under way were stopped with a checkpoint; "
                         "rerun the same command to resume (finished runs and evaluations are kept)")
        self.exit_code = 128 + int(signum)


def _worker_init(parent: int):
    """A study worker: Ctrl-C is the parent's to handle (it stops the workers; no traceback from one),
    and the worker gets SIGTERM when its parent dies, however it dies (Linux: prctl PR_SET_PDEATHSIG)."""
    from ..engine import signals

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals.IGNORE_SIGINT = True  # the worker's training runs leave Ctrl-C ignored too
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the parent's handler stops them
            pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def _raise_stop(signum, _frame):
    raise StudyStopped(signum)


def _stop_workers(pool):
    """SIGTERM to every worker (a training run checkpoints and ends), then wait for them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=300)


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_run(cfg: StudyConfig) -> int:
    return cfg.threads or max(1, cores() // cfg.jobs)


def run_dir(cfg: StudyConfig, arm: str, seed: int) -> str:
    return os.path.join(cfg.out, f"{arm}-seed{seed}")


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# The runs' settings and their FLOPs
# --------------------------------------------------------------------------------------------
def shared_architecture(cfg: StudyConfig) -> dict:
    """The architecture every arm shares on purpose (a controlled comparison): ERW's per-size values for
    ``cfg.model`` — RoPE on, its alignment block and λ0 — also for REPA and vanilla SiT, whose own recipes
    (``--method repa`` / ``vanilla`` alone) would drop RoPE and move the block and λ0."""
    from ..engine.config import model_size
    from ..method.recipes import model_defaults
    from ..models.sit import SIZES

    size = model_size(cfg.model)
    d = model_defaults(size, SIZES[size]["depth"], "erw")
    return dict(rope=d["rope"], encoder_depth=d["encoder_depth"], lambda0=d["lambda0"])


def train_config(cfg: StudyConfig, method: str, **kw):
    """The trainer's settings of a study run (every arm: the same model, architecture, data, optimiser)."""
    from ..engine import TrainConfig
    from .config import data_kind, latent_run_settings

    run = latent_run_settings() if data_kind(cfg.data) == "latents" else {}  # not the 400K-step ImageNet recipe
    return TrainConfig(method=method, model=cfg.model, projector_dim=cfg.projector_dim, encoder=cfg.encoder,
                       features=cfg.features if method != "vanilla" else "online", data=cfg.data,
                       encoder_path=cfg.encoder_path, **({"batch_size": cfg.batch_size} if cfg.batch_size else {}),
                       **shared_architecture(cfg), **{**run, **kw})


def probe_flops(cfg: StudyConfig) -> Dict[str, float]:
    """FLOPs per step of each kind (see ``plan``), counted as the trainer counts them, without training."""
    from ..engine.build import measure_step_flops

    erw = measure_step_flops(train_config(cfg, "erw", warmup_steps=1))
    vanilla = measure_step_flops(train_config(cfg, "vanilla"))
    stopped = measure_step_flops(train_config(cfg, "repa", align_until=0))
    extraction = erw.get("features", 0.0) or stored_extraction_flops(cfg)
    return {"vanilla": float(vanilla["train"]), "full": float(erw["train"]), "warmup": float(erw["warmup"]),
            "unaligned": float(stopped["train"]), "features": float(extraction)}


def stored_extraction_flops(cfg: StudyConfig) -> float:
    """The one-off extraction of the target features ``python -m erw_fast.extract_features`` stored in a
    latent dataset (``--features precomputed`` on latents; 0 otherwise), counted as the digits' extraction
    is: the encoder's FLOPs on one of the dataset's images, at the stored token grid, times its size."""
    from .config import data_kind, folder_data, stored_features

    if cfg.features != "precomputed" or data_kind(cfg.data) != "latents":
        return 0.0
    from ..encoders import build_encoder
    from ..utils.flops import count_flops

    data, store = folder_data(cfg.data), stored_features(cfg.data, cfg.encoder)
    enc = build_encoder(cfg.encoder, token_grid=store.token_grid, **({"path": cfg.encoder_path} if cfg.encoder_path
                                                                    else {}))
    one = data.encoder_images([0])
    with torch.no_grad():
        return float(count_flops(lambda: enc(one))) * data.num_samples


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
def train_run(cfg: StudyConfig, plan: RunPlan, seed: int, threads: int) -> str:
    """Train one run (or resume an unfinished one); its output goes to ``<run>/train.log``."""
    from ..engine import train
    from ..engine.checkpoint import folder_holds_run
    from ..models.checkpoint import list_checkpoints

    out = run_dir(cfg, plan.arm, seed)
    done = os.path.join(out, "done.json")
    if os.path.exists(done):
        steps = json.load(open(done)).get("steps")
        if steps != plan.total_steps:
            raise StudyError(f"{out} was trained for {steps} steps, but this plan gives {plan.arm} {plan.total_steps} "
                             "(the FLOPs per step changed?); use another --out")
        return out
    resume = bool(list_checkpoints(out))
    if not resume and folder_holds_run(out):  # killed before its first checkpoint: start it over
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    tc = train_config(cfg, plan.method, out=out, seed=seed, steps=plan.steps, align_until=plan.align_until,
                      warmup_steps=plan.warmup_steps if plan.method == "erw" else None,
                      ckpt_at=tuple(plan.eval_steps), samples_per_class=1, threads=threads, progress=False,
                      resume="auto" if resume else None)
    t0 = time.time()
    with open(os.path.join(out, "train.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        res = train(tc)
    if res.status == "interrupted" and res.signal is not None:
        raise StudyStopped(res.signal)
    if res.status != "finished":
        raise StudyError(f"{out}: training ended with status {res.status!r} (see {out}/train.log); run the same "
                         "command again to resume it (finished runs and evaluations are kept)")
    with open(done, "w") as f:
        json.dump({"summary": res.summary, "steps": res.steps, "wall_seconds": time.time() - t0, "threads": threads,
                   "jobs": cfg.jobs}, f, default=str)
    return out


def extraction_seconds(folder: str) -> float:
    """Seconds of the run's one-off feature extraction (its first ``features`` event; 0 without one)."""
    ev = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r.get("event") == "features"]
    return float(sum(r["seconds"] for r in ev[:1]))


@lru_cache(maxsize=2)
def reference_images(data: str, digits: Tuple[int, ...] = tuple(range(10))) -> torch.Tensor:
    """The images every FD of the study is measured against, float (N, C, H, W) in [-1, 1]: the
    embedded digits of ``digits`` (all 1,797 by default; a digits:5-9 run's own), every image of the
    folder at the trainer's resolution, or, on latents, the images the dataset stores beside its latents
    (``config.reference_indices``: at most 5,000, evenly spaced). Those are the source images, centre-
    cropped at the dataset's resolution by ``python -m erw_fast.preprocess`` — the real images, as ADM's
    reference batches are, not VAE reconstructions (decoding the dataset's own latents would build the
    VAE's error into the reference and hide it from the scores), and they are there even when the source
    folder the index records has moved or is gone."""
    if is_digits(data):
        from ..data.digits import load_digits

        x, y = load_digits(16)
        return x if len(digits) == 10 else x[torch.isin(y, torch.tensor(digits))]
    from .config import data_kind, folder_data, reference_indices

    if data_kind(data) == "latents":
        return folder_data(data).encoder_images(reference_indices(data)).float() / 127.5 - 1.0
    return folder_data(data).images.float() / 127.5 - 1.0


@lru_cache(maxsize=2)
def _encoder_space(name: str, data: str = "digits", path: Optional[str] = None,
                   digits: Tuple[int, ...] = tuple(range(10))):
    """(feature network, reference (mu, sigma) of the reference images) of ``fd_<name>``; DINOv2 at its
    default 224-px input, as Stein et al. feed it."""
    from ..encoders import build_encoder
    from ..metrics import EncoderFeatures, encoder_fd_stats

    enc = build_encoder(name, **({"path": path} if path else {}))
    return EncoderFeatures(enc), encoder_fd_stats(enc, reference_images(data, digits))


@lru_cache(maxsize=2)
def fid_space(data: str, inception: Optional[str], digits: Tuple[int, ...] = tuple(range(10))):
    """(FID feature network, reference (mu, sigma)), or (None, None) without one: the digits classifier
    against the embedded digits of ``digits``, or a local Inception file against the folder's images."""
    from ..metrics import digits_reference_stats, feature_stats, compute_features, get_feature_network

    if is_digits(data):
        return get_feature_network("digits"), digits_reference_stats(digits=digits)
    if not inception:
        return None, None
    net = get_feature_network("inception", inception)
    return net, feature_stats(compute_features(reference_images(data), net))


DECODE_BATCH = 16  # latents decoded at a time: bounds the VAE decoder's memory whatever --eval-batch is


def latent_decoder(data: str):
    """On latents: generated latents → images in [-1, 1] with the dataset's VAE, ``DECODE_BATCH`` at a time
    (``LatentData.decode``, as the trainer's online evaluation decodes); None on other data."""
    from .config import data_kind, folder_data

    if data_kind(data) != "latents":
        return None
    return lambda z: torch.cat([folder_data(data).decode(c) for c in z.split(DECODE_BATCH)])


def evaluate_checkpoint(cfg, path: str, extra_seconds: float = 0.0) -> dict:
    """FID (None off the digits without an Inception file), classifier accuracy (digits only) and
    ``fd_<encoder>`` (the FD in the target encoder's space) of the checkpoint's EMA model (on latents its
    samples decoded with the dataset's VAE, against ``reference_images``); on the digits
    class k is scored as the digit its class name says (a digits:5-9 run's class 0 is a 5) and both
    references hold the run's digits only; ``seconds``: its training wall clock (extraction and warmup
    included). ``cfg``: a StudyConfig (or the reuse study's settings: digits, the run's own encoder
    when ``cfg.encoder`` is None)."""
    from ..data.digits import class_digits
    from ..engine.checkpoint import read_training_checkpoint
    from ..metrics import classifier_accuracy, compute_features, fd_name, feature_stats, frechet_distance
    from ..models.checkpoint import load_checkpoint
    from ..sampling.generate import generate

    ckpt = read_training_checkpoint(path)
    model = load_checkpoint(ckpt, which="ema").eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    data = getattr(cfg, "data", "digits")
    arr, labels = generate(model, range(cfg.num_samples), shape, list(range(model.num_classes)), seed=cfg.eval_seed,
                           sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                           batch_size=cfg.eval_batch, decoder=latent_decoder(data))
    wc = ckpt.get("warmup_cost") or {}
    seconds = float(ckpt.get("phase_seconds", 0.0)) + extra_seconds + \
        (float(wc.get("seconds", 0.0)) if ckpt["phase"] == "train" else 0.0)
    digits = tuple(class_digits(ckpt["args"].get("class_names"))) if is_digits(data) else tuple(range(10))
    encoder = cfg.encoder or ckpt["args"]["encoder"]
    enc_net, enc_ref = _encoder_space(encoder, data, getattr(cfg, "encoder_path", None), digits)
    fd = frechet_distance(*feature_stats(compute_features(arr, enc_net)), *enc_ref)
    net, ref_stats = fid_space(data, getattr(cfg, "inception", None), digits)
    fid = frechet_distance(*feature_stats(compute_features(arr, net)), *ref_stats) if net is not None else None
    out = {"fid": fid, fd_name(encoder): fd}
    if is_digits(data):
        out["accuracy"] = classifier_accuracy(arr, np.asarray(digits)[labels], net)
    return {**out, "seconds": seconds}


def warmup_fit(cfg: StudyConfig, plan: RunPlan, folder: str) -> Optional[dict]:
    """The target encoder's fit after an ERW run's warmup: CKNNA at the aligned block between the
    warmed-up model (its end-of-warmup checkpoint) and the encoder, on the probe's held-out digits
    (``erw_fast.evaluation.probe``, its defaults: 256 validation images, t = 0, topk 10); kept in
    ``<run>/fit.json``. None for arms without a warmup."""
    from ..engine.checkpoint import checkpoint_path
    from ..evaluation.probe import probe_checkpoint

    if plan.method != "erw" or not plan.warmup_steps:
        return None
    path = os.path.join(folder, "fit.json")
    if os.path.exists(path):
        return json.load(open(path))
    num_images = 256
    if cfg.data != "digits":
        from .config import folder_size

        num_images = min(num_images, folder_size(cfg.data))
        if num_images < 12:  # the probe's topk 10 needs more images: no fit for a folder this small
            return None
    res = probe_checkpoint(checkpoint_path(folder, plan.warmup_steps), data=cfg.data, encoder=cfg.encoder,
                           encoder_path=cfg.encoder_path, noise_levels=(), num_images=num_images)
    block = res["aligned_block"]
    fit = dict(arm=plan.arm, step=plan.warmup_steps, encoder=res["encoder"], aligned_block=block,
               num_images=res["num_images"], topk=res["topk"], cknna=res["blocks"][block]["cknna"][0.0])
    with open(path, "w") as f:
        json.dump(fit, f)
    return fit


def evaluate_run(cfg: StudyConfig, plan: RunPlan, seed: int, flops: Dict[str, float], folder: str) -> List[dict]:
    """Evaluate the run's planned checkpoints that ``<run>/evals.jsonl`` does not hold yet; returns all."""
    from ..engine.checkpoint import checkpoint_path
    from ..metrics import fd_name

    path = os.path.join(folder, "evals.jsonl")
    have = {r["step"]: r for r in read_jsonl(path)}
    todo = [k for k in plan.eval_steps if k not in have]
    extra = extraction_seconds(folder) if todo else 0.0
    for k in todo:
        t0 = time.time()
        ev = evaluate_checkpoint(cfg, checkpoint_path(folder, k), extra)
        rec = dict(arm=plan.arm, seed=seed, step=k, fraction=plan.eval_fractions[plan.eval_steps.index(k)],
                   flops=compute_at(flops, plan, k), **ev, eval_seconds=time.time() - t0)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        have[k] = rec
        fid = "n/a" if ev["fid"] is None else f"{ev['fid']:.2f}"
        acc = f", accuracy {ev['accuracy'] * 100:.1f}%" if "accuracy" in ev else ""
        say(f"    {plan.arm} seed {seed} at {rec['fraction'] * 100:.0f}% of the budget (step {k}): FID {fid}, "
            f"{fd_name(cfg.encoder)} {ev[fd_name(cfg.encoder)]:.3g}{acc} ({rec['eval_seconds']:.0f} s to evaluate)")
    return [have[k] for k in plan.eval_steps]


def run_arm(cfg: StudyConfig, plan: RunPlan, seed: int, flops: Dict[str, float], threads: int) -> dict:
    """Train and evaluate one (arm, seed) with ``threads`` CPU threads (a worker process's entry)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        folder = train_run(cfg, plan, seed, threads)
        t1 = time.time()
        records = evaluate_run(cfg, plan, seed, flops, folder)
        fit = warmup_fit(cfg, plan, folder)
        return dict(arm=plan.arm, seed=seed, records=records, fit=fit, train_wall=t1 - t0, eval_wall=time.time() - t1)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# All runs
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    arm: Arm
    plan: RunPlan
    seed: int


def _failed(cfg: StudyConfig, job: Job, e: BaseException) -> StudyError:
    """One line naming the run that failed and where to look; finished runs and evaluations are kept."""
    if isinstance(e, StudyError):
        return e
    folder = run_dir(cfg, job.arm.name, job.seed)
    return StudyError(f"{job.arm.name} seed {job.seed} failed ({type(e).__name__}: {e}); training output in "
                      f"{folder}/train.log. Rerun the same command to resume (finished runs and evaluations are kept)")


def _finished_line(i: int, n: int, job: Job, out: dict, t_start: float) -> str:
    recs, key = out["records"], "fid" if out["records"] and out["records"][0]["fid"] is not None else None
    key = key or next((k for k in (recs[0] if recs else {}) if k.startswith("fd_")), "fid")
    fid = f"{'FID' if key == 'fid' else key} " + " → ".join(format(r[key], ".2f" if key == "fid" else ".3g") for r in recs)
    el = (time.time() - t_start) / 60
    fit = f"; CKNNA after the warmup {out['fit']['cknna']:.3f}" if out.get("fit") else ""
    return (f"[{i}/{n}] {job.arm.name} seed {job.seed} done: trained in {out['train_wall']:.0f} s, evaluated in "
            f"{out['eval_wall']:.0f} s; {fid}{fit} ({el:.1f} min so far, ~{el / i * (n - i):.1f} min left)")


def run_jobs(cfg: StudyConfig, jobs: Sequence[Job], flops: Dict[str, float]) -> None:
    """Every job, ``cfg.jobs`` at a time (worker processes; 1 = in this process). A failed run stops
    the study with its arm, seed and folder named; finished runs and evaluations are kept."""
    threads, n, t_start = threads_per_run(cfg), len(jobs), time.time()
    say(f"convergence study: {n} runs, {min(cfg.jobs, max(n, 1))} at a time, {threads} CPU thread(s) each; "
        f"training logs in {cfg.out}/<arm>-seed<seed>/train.log")
    if cfg.jobs == 1 or n <= 1:
        for i, job in enumerate(jobs, 1):
            say(f"[{i}/{n}] {job.arm.name} seed {job.seed}: {job.plan.warmup_steps} warmup + {job.plan.steps} steps")
            try:
                out = run_arm(cfg, job.plan, job.seed, flops, threads)
            except Exception as e:
                raise _failed(cfg, job, e) from e
            say(_finished_line(i, n, job, out, t_start))
        return
    with stoppable_pool(cfg.jobs) as pool:
        pending = {pool.submit(run_arm, cfg, j.plan, j.seed, flops, threads): j for j in jobs}
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    out = fut.result()
                except Exception as e:
                    err = _failed(cfg, job, e)
                    say(f"error: {err}\nwaiting for the run(s) under way to finish (they are kept) ...")
                    raise err from e
                done_count += 1
                say(_finished_line(done_count, n, job, out, t_start))


@contextlib.contextmanager
def stoppable_pool(workers: int):
    """A pool of ``workers`` spawned processes (no fork of a process that holds torch threads) for the
    studies' runs: the workers ignore Ctrl-C and die with this process (``_worker_init``); SIGTERM,
    SIGHUP or Ctrl-C here stops them (each run checkpoints and ends) and raises ``StudyStopped``."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM/SIGHUP stop the workers too
        handlers = {sg: signal.signal(sg, _raise_stop) for sg in (signal.SIGTERM, signal.SIGHUP)}
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            try:
                yield pool
            except (KeyboardInterrupt, StudyStopped):
                say("stopping: the runs under way checkpoint and end ...")
                _stop_workers(pool)  # before shutdown, which forgets the worker processes
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    except KeyboardInterrupt:
        raise StudyStopped(signal.SIGINT) from None
    finally:
        for sg, h in handlers.items():
            signal.signal(sg, h)


def collect_results(cfg: StudyConfig, plans: Dict[str, RunPlan], seeds: Sequence[int]) -> List[dict]:
    """Every planned evaluation found in ``out`` (all arms, all seeds evaluated there), in order."""
    out = []
    for name, plan in plans.items():
        for s in seeds:
            recs = {r["step"]: r for r in read_jsonl(os.path.join(run_dir(cfg, name, s), "evals.jsonl"))}
            out += [recs[k] for k in plan.eval_steps if k in recs]
    return out


def collect_fits(cfg: StudyConfig, names: Sequence[str], seeds: Sequence[int]) -> Dict[str, Dict[str, dict]]:
    """Per ERW arm and seed: the warmup fit (``<run>/fit.json``) where the run has one."""
    out: Dict[str, Dict[str, dict]] = {}
    for n in names:
        for s in seeds:
            path = os.path.join(run_dir(cfg, n, s), "fit.json")
            if os.path.exists(path):
                out.setdefault(n, {})[str(s)] = json.load(open(path))
    return out


def run_conditions(cfg: StudyConfig, names: Sequence[str], seeds: Sequence[int]) -> List[Tuple[int, int]]:
    """The distinct (runs at a time, threads per run) under which the finished runs trained."""
    got = set()
    for n in names:
        for s in seeds:
            path = os.path.join(run_dir(cfg, n, s), "done.json")
            if os.path.exists(path):
                d = json.load(open(path))
                got.add((int(d.get("jobs", 0)), int(d.get("threads", 0))))
    return sorted(got)


def seeds_in(cfg: StudyConfig) -> List[int]:
    """The seeds that have run folders in ``out`` (a later call may add seeds)."""
    seeds = set()
    if os.path.isdir(cfg.out):
        for name in os.listdir(cfg.out):
            head, sep, tail = name.rpartition("-seed")
            if sep and tail.isdigit():
                seeds.add(int(tail))
    return sorted(seeds)


def data_floor(cfg: StudyConfig, repeats: int = 3) -> Optional[Tuple[float, float]]:
    """FID of ``num_samples`` real digits (random subsets) against the reference: the best a model can
    score with this many samples (None off the digits)."""
    if cfg.data != "digits":
        return None
    from ..data.digits import load_digits
    from ..metrics import (compute_features, digits_reference_stats, feature_stats, frechet_distance,
                           get_feature_network)
    from ..utils.images import to_uint8

    images, _ = load_digits()
    net, ref = get_feature_network("digits"), digits_reference_stats()
    g = np.random.default_rng(cfg.eval_seed)
    vals = []
    for _ in range(repeats):
        idx = g.choice(len(images), size=min(cfg.num_samples, len(images)), replace=False)
        arr = to_uint8(images[torch.as_tensor(idx)]).transpose(0, 2, 3, 1)
        vals.append(frechet_distance(*feature_stats(compute_features(arr, net)), *ref))
    return mean_std(vals)


def final_losses(folder: str, tail: float = 0.1) -> dict:
    """Mean velocity and alignment loss over the last ``tail`` of the full-training log records."""
    recs = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r.get("phase") == "train" and "loss" in r]
    if not recs:
        return {}
    recs = recs[-max(1, int(len(recs) * tail)):]
    return dict(velocity=float(np.mean([r["loss_velocity"] for r in recs])),
                align=float(np.mean([r["loss_align"] for r in recs])))


"""Training-step benchmarks (pytest-benchmark): naive baseline vs ours, per ERW step kind.

    pytest bench/bench_train_step.py --benchmark-only          # or all of bench/
    ERW_STEP_BENCH_OUT=DIR pytest bench/ --benchmark-only       # also writes DIR/step_results.{json,md}

Benchmarks: ``test_step[<kind>-<side>]`` on CPU (the small config), ``test_step[<size>-<kind>-<side>]``
on CUDA (``B2`` = SiT-B/2, ``XL2`` = SiT-XL/2, 256 px, bf16); kind = warmup | full | repa | vanilla,
side = naive | ours.  What the sides are: ``bench/naive_baseline.py`` and ``bench/step_bench.py``.

The two sides of a kind run back to back on the same (cached) weights and batches, and the
``ours`` test then times both sides **interleaved** (naive, ours, ours, naive, ...): that ratio,
measured in one stretch of time, is the headline (this box is shared; separate medians drift).
Compile time is excluded (untimed warm-up steps).  extra_info: ``img_per_s``, ``peak_mem_gib``
(CUDA; None on CPU: no allocator statistics), ``mfu`` and ``flops_per_step`` (CUDA).  A session-end
table (``bench/_step_report.py``) prints naive img/s, ours img/s and the ratio per kind.

CPU: fp32, one intra-op thread (``ERW_STEP_THREADS`` to change), ``ERW_STEP_ROUNDS`` timed rounds,
``ERW_STEP_BATCH`` to override the batch (default: 64 CPU, 256 SiT-B/2, 64 SiT-XL/2).
``ERW_STEP_SIZES`` (comma-separated: small, SiT-B/2, SiT-XL/2) overrides the sizes.

``test_step_fp8[<size>]``: our full ERW step with ``--precision fp8`` (torchao float8 linears,
compiled; img/s and MFU against the bf16 peak in extra_info); skipped, saying why, without a CUDA
card of compute capability >= 8.9 and torchao (CPU float8 is torchao's emulation: no speed to measure).
"""
import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_bench as sb  # noqa: E402

pytest_plugins = ["_step_report"]

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
_default_sizes = "SiT-B/2,SiT-XL/2" if CUDA else "small"
SIZES = [s.strip() for s in os.environ.get("ERW_STEP_SIZES", _default_sizes).split(",") if s.strip()]
SHORT = {"small": "", "SiT-B/2": "B2", "SiT-XL/2": "XL2"}
ROUNDS = int(os.environ.get("ERW_STEP_ROUNDS", "6" if CUDA else "12"))
THREADS = int(os.environ.get("ERW_STEP_THREADS", "1"))
GROUP_OF = {"warmup": "warm", "full": "full", "repa": "full", "vanilla": "full"}
CASES = [(size, kind, side) for size in SIZES for kind in sb.KINDS for side in ("naive", "ours")]


def _id(case):
    size, kind, side = case
    return "-".join(p for p in (SHORT.get(size, size.replace("/", "")), kind, side) if p)


# --------------------------------------------------------------------------------------------
# One cached comparison at a time (the warmup pair, then the full pair shared by full/repa/vanilla)
# --------------------------------------------------------------------------------------------
_CACHE = {}


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _comparison(size, kind):
    key = (size, GROUP_OF[kind])
    if _CACHE.get("key") != key:
        _CACHE.clear()
        _free()
        if CUDA:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cfg = dict(sb.SIZES[size])
        if os.environ.get("ERW_STEP_BATCH"):
            cfg["batch"] = int(os.environ["ERW_STEP_BATCH"])
        enc = sb.build_target_encoder(cfg["encoder"], DEV, cfg["input_size"])
        pair = sb.Pair(cfg, kind == "warmup", DEV, enc, compile=True)
        _CACHE.update(key=key, cfg=cfg, pair=pair, batches=sb.make_batches(cfg, DEV), steps={})
    steps = _CACHE["steps"]
    if kind not in steps:
        naive, ours = _CACHE["pair"].steps(kind)
        b = _CACHE["batches"]
        sb.warm_up(ours, b, DEV, 3)  # the first call compiles the blocks (fwd + bwd)
        sb.warm_up(naive, b, DEV, 2)
        info = dict(flops=sb.step_flops(naive, b[1]) if CUDA else None)
        steps[kind] = (naive, ours, info)
    return _CACHE["cfg"], _CACHE["batches"], steps[kind]


class _Cycle:
    def __init__(self, step, batches):
        self.step, self.batches, self.i = step, batches, 0

    def __call__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.step(b)
        sb.sync(DEV)


def _median(benchmark):
    try:
        return benchmark.stats.stats.median
    except AttributeError:
        return None


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_step(benchmark, case):
    size, kind, side = case
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(THREADS)  # shared 2-core box: one thread per process is the stable choice
    try:
        cfg, batches, (naive, ours, info) = _comparison(size, kind)
        step = naive if side == "naive" else ours
        benchmark.group = f"train-step-{size}-{kind}"
        mem = sb.step_peak_mem(step, batches[0], DEV)
        benchmark.pedantic(_Cycle(step, batches), rounds=ROUNDS, iterations=1, warmup_rounds=1)
        med = _median(benchmark)
        B = cfg["batch"]
        extra = dict(step_kind=kind, side=side, size=size, batch=B, device=str(DEV),
                     threads=torch.get_num_threads(), dtype="bf16 autocast" if CUDA else "fp32",
                     img_per_s=(B / med) if med else None,
                     peak_mem_gib=None if mem is None else mem / 2 ** 30,
                     flops_per_step=info["flops"])
        if CUDA and med and info["flops"]:
            extra["mfu"] = info["flops"] / med / sb.H100_BF16_DENSE
        benchmark.extra_info.update(extra)
        entry = sb.REPORT.setdefault((size, kind), dict(size=size, kind=kind, batch=B,
                                                         threads=torch.get_num_threads()))
        entry[f"{side}_bench_median_s"] = med
        entry[f"{side}_peak_mem_gib"] = extra["peak_mem_gib"]
        if side == "ours":
            # the headline: both sides interleaved, in one stretch of time
            tn, to = sb.interleaved(naive, ours, batches, DEV, ROUNDS)
            row = sb.summarise(size, kind, B, tn, to, info["flops"], None, None, None, DEV)
            for k in ("naive_peak_mem_gib", "ours_peak_mem_gib"):
                row[k] = entry.get(k)
            if entry.get("naive_bench_median_s") and med:
                row["bench_ratio"] = entry["naive_bench_median_s"] / med
            if kind == "full":  # where the time goes, phase by phase
                row["naive_phases"] = sb.phase_times(naive, batches[0], DEV, 3)
                row["ours_phases"] = sb.phase_times(ours, batches[0], DEV, 3)
            entry.update(row)
            benchmark.extra_info.update(interleaved_ratio=row["ratio"], interleaved_naive_img_s=row["naive_img_s"],
                                        interleaved_ours_img_s=row["ours_img_s"])
            assert row["ratio"] > 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [s for s in SIZES if s != "small"] or ["small"])
def test_step_fp8(benchmark, size):
    why = sb.fp8_skip_reason(DEV) if CUDA else ("--precision fp8 is timed on a CUDA card of compute capability "
                                                 ">= 8.9; on CPU torchao only emulates float8 (numerics, no speed)")
    if why:
        pytest.skip(why)
    _CACHE.clear()
    _free()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = dict(sb.SIZES[size])
    if os.environ.get("ERW_STEP_BATCH"):
        cfg["batch"] = int(os.environ["ERW_STEP_BATCH"])
    enc = sb.build_target_encoder(cfg["encoder"], DEV, cfg["input_size"])
    batches = sb.make_batches(cfg, DEV)
    trainer, flops = sb.fp8_trainer(cfg, DEV, enc, batches[0], "tensorwise", compile=True)
    step = lambda b: trainer.train_step(sb.engine_batch("full", b), sb.SCHEDULE_STEP)  # noqa: E731
    sb.warm_up(step, batches, DEV, 3)  # compiles the blocks with the float8 casts
    benchmark.group = f"train-step-{size}-full-fp8"
    benchmark.pedantic(_Cycle(step, batches), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    med = _median(benchmark)
    benchmark.extra_info.update(step_kind="full", side="ours", size=size, batch=cfg["batch"], dtype="fp8 (tensorwise)",
                                img_per_s=cfg["batch"] / med if med else None, flops_per_step=flops,
                                mfu=flops / med / sb.H100_BF16_DENSE if (med and flops) else None)

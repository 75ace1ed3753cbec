"""Engine helpers: seeded per-sample draws, EMA, checkpoints, logging, progress bar, DDP set-up."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

_M64 = 0xFFFFFFFFFFFFFFFF


# --------------------------------------------------------------------------------------------
# Seeds: splitmix64 over a tuple of integers
# --------------------------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (order matters); nearby tuples give unrelated seeds."""
    z = 0x2545F4914F6CDD1D
    for v in values:
        z = (z ^ (int(v) & _M64)) & _M64
        z = (z + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


STREAM_DATA, STREAM_WARMUP, STREAM_TRAIN, STREAM_INIT = 1, 2, 3, 4


def sample_draws(seed: int, stream: int, step: int, indices, shape, dropout: float, with_noise: bool = True):
    """Per-sample noise (len, *shape), time (len,) and label-drop (len,) bool, each sample's draws
    seeded by (seed, stream, step, global sample index): independent of how the batch is split."""
    noise, times, drops = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(mix_seed(seed, stream, step, int(i)))
        drops.append(torch.rand((), generator=g) < dropout)
        times.append(torch.rand((), generator=g))
        if with_noise:
            noise.append(torch.randn(tuple(shape), generator=g))
    nz = torch.stack(noise) if with_noise else None
    return nz, torch.stack(times), torch.stack(drops)


class BatchIndexer:
    """Global batch ``step`` = positions [step*G, (step+1)*G) of an endless stream of seeded epoch
    permutations of the dataset; rank r takes its contiguous slice of the global batch."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.n, self.G, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.local = global_batch // world
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, STREAM_DATA, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, step: int):
        """(dataset indices, global sample indices within the batch) of this rank."""
        j = torch.arange(self.rank * self.local, (self.rank + 1) * self.local)
        pos = step * self.G + j
        epochs, offsets = pos // self.n, pos % self.n
        idx = torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets)])
        return idx, j


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's floating-point parameters (torch._foreach_lerp_)."""

    def __init__(self, ema_model: torch.nn.Module, model: torch.nn.Module):
        self.ema_model = ema_model
        pairs = [(e, m) for e, m in zip(ema_model.parameters(), model.parameters()) if m.is_floating_point()]
        self.ema_params = [e for e, _ in pairs]
        self.model_params = [m for _, m in pairs]
        for p in ema_model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, decay: float):
        torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - decay)

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module):
        self.ema_model.load_state_dict(model.state_dict())


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_atomic(obj, path: str):
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_CKPT = re.compile(r"^(\d+)\.pt$")


def list_checkpoints(out: str) -> List[str]:
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := _CKPT.match(n)))
    return [os.path.join(folder, n) for _, n in names]


def read_training_checkpoint(path: str) -> dict:
    from ..models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    needed = ("model", "ema", "opt", "args", "steps", "phase", "phase_step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an erw_fast training checkpoint (needs {needed}; has {have})")
    return ckpt


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; mirrors scalars to TensorBoard when installed."""

    def __init__(self, out: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except Exception:
                self.tb = None

    def write(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record.get('phase', 'run')}/{k}", v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, periodic lines otherwise)."""

    def __init__(self, enabled: bool = True, stream=None, bar: bool = True):
        self.enabled = enabled  # messages (start line, transfer, summary)
        self.bar = bar and enabled  # the progress bar itself
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_len = 0
        self.last_line_time = 0.0

    def update(self, phase: str, step: int, total: int, fields: Dict[str, float], final: bool = False):
        if not self.bar:
            return
        width = 24
        frac = step / max(total, 1)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"{phase:>6} [{bar}] {step}/{total} {parts}"
        now = time.time()
        if self.tty:
            pad = max(0, self.last_len - len(line))
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
            self.last_len = len(line)
        elif final or now - self.last_line_time > 10:
            self.stream.write(line + "\n")
            self.last_line_time = now
        self.stream.flush()

    def message(self, text: str):
        if not self.enabled:
            return
        if self.tty and self.last_len:
            self.stream.write("\n")
            self.last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
def setup_distributed(device_pref: str = "auto"):
    """(rank, world, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        use_cuda = torch.cuda.is_available()
    elif device_pref == "cpu":
        use_cuda = False
    elif device_pref.startswith("cuda"):
        use_cuda = True
    else:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device_pref!r}")
    if use_cuda:
        index = local if world > 1 else (torch.device(device_pref).index or 0 if device_pref != "auto" else 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def all_true(flag: bool, world: int, device) -> bool:
    """True on every rank if ``flag`` is true on any rank (for stop signals)."""
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def human_flops(f: float) -> str:
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= div:
            return f"{f / div:.2f} {unit}"
    return f"{f:.0f} FLOP"


def isfinite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# Input prefetch
# --------------------------------------------------------------------------------------------
def map_tensors(fn, obj):
    """``fn`` applied to every tensor in nested tuples/lists (None and other leaves are kept)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


class Prefetcher:
    """``get(k)`` returns ``fn(k)``; with ``depth > 0`` a background thread computes the next
    ``depth`` results while the caller trains on this one. ``fn`` must be a pure function of ``k``
    (the training batches are: every draw is seeded by (seed, step, sample)), so the results are
    the same with and without prefetching. The thread does host work only: shard reads (NumPy
    releases the GIL), posterior sampling, pinning."""

    def __init__(self, fn, depth: int = 0):
        self.fn, self.depth = fn, max(0, int(depth))
        self._pool = None
        self._futures: Dict[int, object] = {}
        if self.depth:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erw_fast-prefetch")

    def get(self, k: int):
        if self._pool is None:
            return self.fn(k)
        fut = self._futures.pop(k, None) or self._pool.submit(self.fn, k)
        for ahead in range(k + 1, k + 1 + self.depth):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(self.fn, ahead)
        for stale in [s for s in self._futures if s < k or s > k + self.depth]:
            self._futures.pop(stale).cancel()
        return fut.result()

    def close(self):
        if self._pool is not None:
            for f in self._futures.values():
                f.cancel()
            self._futures.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

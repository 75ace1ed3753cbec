"""Process-group set-up and the few collectives erw_fast uses (one place for every entry point).

``setup_distributed(device)`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the
device (each process its LOCAL_RANK's GPU), calls ``torch.cuda.set_device`` and starts the process
group (NCCL on GPU, with ``device_id`` so the first collective does not guess the GPU; gloo on CPU).
With one process it starts nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_ranks():
    """(rank, world, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(pref: str = "auto", local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun each process
    takes the GPU of its local rank."""
    if pref == "auto":
        use_cuda = torch.cuda.is_available()
    elif pref == "cpu":
        use_cuda = False
    elif pref.startswith("cuda"):
        use_cuda = True
    else:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {pref!r}")
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {pref}: {why} (torch {torch.__version__}); use --device cpu or auto")
    if world > 1:  # under torchrun each process takes its local rank's GPU (a cuda:N is not used)
        index = local_rank % max(torch.cuda.device_count(), 1)
    else:
        try:
            index = torch.device(pref).index or 0 if pref != "auto" else 0
        except RuntimeError:
            raise ValueError(f"--device {pref!r}: use auto, cpu, cuda or cuda:N") from None
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {pref}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def setup_distributed(device_pref: str = "auto", process_group: bool = True) -> Dist:
    """This process's rank, world size and device; starts the process group under torchrun
    (``process_group=False``: ranks that share only a folder, e.g. preprocessing)."""
    rank, world, local = env_ranks()
    device = pick_device(device_pref, local, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if process_group and world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return Dist(rank, world, device)


def barrier(world: int):
    if world > 1 and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce; call it rarely)."""
    if world <= 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def max_over_ranks(value: int, world: int, device) -> int:
    if world <= 1:
        return int(value)
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(values, world: int, device) -> list:
    """The mean of each value over all ranks (one all-reduce in float64; the values unchanged with one
    process)."""
    if world <= 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

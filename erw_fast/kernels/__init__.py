"""Fused Triton kernels for erw_fast (installed as ``erw_fast.kernels``).

One module per fused op; each holds the ``@triton.jit`` kernels (forward and backward) and plain
launcher functions that take torch tensors.  This ``__init__`` does not import triton, so
``erw_fast.kernels.LAUNCHES`` can be read (and ``erw_fast.ops`` imported) without Triton.

``LAUNCHES`` counts kernel launches per launcher name (e.g. ``"layernorm_modulate_fwd"``); tests use
it to prove that the Triton path really ran.

``TRITON_INTERPRET=1`` must be set before a kernel module is imported for its kernels to run on CPU
tensors (Triton decides between compiled and interpreted kernels at decoration time); each kernel
module records ``INTERPRET`` (the value it saw) when imported.

``POISON``: when True, every buffer the launchers (and the chunked loss driver in ``erw_fast.ops``)
allocate is filled with NaN first, so an element a kernel fails to write shows up in tests.
"""
import contextlib
import functools
import os

import torch

LAUNCHES = {}
POISON = False


def interpret_env() -> bool:
    """True when the environment asks for the Triton CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def count_launch(name, n=1):
    """Record ``n`` launches of the kernel(s) behind launcher ``name``."""
    LAUNCHES[name] = LAUNCHES.get(name, 0) + n


def reset_launches():
    LAUNCHES.clear()


def empty(shape, dtype, device):
    """``torch.empty``, NaN-filled when ``POISON`` is set (float dtypes)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def device_guard(t):
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


__all__ = ["LAUNCHES", "POISON", "interpret_env", "count_launch", "reset_launches", "empty", "device_guard", "sm_count"]


def split_rows(T, splits, block_t):
    """-> (rows_per_split, splits): whole tiles of ``block_t`` rows per split, empty splits dropped
    (the T-split of the backward kernels' partial reductions)."""
    rows_per_split = -(-(-(-T // splits)) // block_t) * block_t
    return rows_per_split, -(-T // rows_per_split)

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
    """True when the environment asks for the Triton CPU interpreter (and then makes sure the
    interpreter can run our kernels: ``fix_interpreter_loop_bounds``)."""
    on = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    if on:
        fix_interpreter_loop_bounds()
    return on


def fix_interpreter_loop_bounds() -> bool:
    """Triton 3.6's CPU interpreter (the torch 2.11 stack) turns a scalar kernel argument used as a
    ``range`` bound into ``int(1-element array)``, which numpy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); newer Triton squeezes the array first. Wrap the
    interpreter's tensor patch to read the one element instead. No-op on a Triton that does it
    already or has no interpreter; returns True when the fix was applied."""
    try:
        import inspect

        from triton.runtime import interpreter as itp

        patch = itp._patch_lang_tensor
        old = "int(self.handle.data))" in inspect.getsource(patch)
    except Exception:  # another Triton layout: nothing to fix here
        return False
    if not old or getattr(patch, "erw_fixed", False):
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.erw_fixed = True
    itp._patch_lang_tensor = patched
    return True


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

"""Attention backends for the SiT blocks: flash-attn, xformers, PyTorch SDPA and plain math.

Every backend takes ``q, k, v`` in the layout the block produces, ``(B, H, N, Dh)``, and returns
``(B, H, N, Dh)``. flash-attn and xformers want ``(B, N, H, Dh)``; the glue transposes for them.

``resolve_backend(name)`` runs once, when a block is built: it checks that an explicitly
requested backend can run here and raises a clear error otherwise. ``auto`` prefers flash-attn
when it is importable and the call's inputs qualify (CUDA, fp16/bf16, supported head dim), then
xformers if a one-time probe shows its kernel really runs, else SDPA. The xformers probe
(``xformers_usable``) runs when a block is built, outside any compiled region, and the block keeps its
answer (``Attention.xformers_ok``) and hands it to ``attention``; so a compiled forward never traces
the probe. The choice for a given input is made from static properties only (device, dtype, shape),
so it is torch.compile-safe.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")

# Module-level handles so the glue can be tested with stand-ins that share the real signatures.
flash_attn_func = None
memory_efficient_attention = None
try:  # pragma: no cover - flash-attn is a GPU-only optional extra
    from flash_attn import flash_attn_func  # type: ignore  # noqa: F811
except Exception:  # ImportError, or a CUDA/ABI mismatch at import time
    flash_attn_func = None
try:  # pragma: no cover - xformers is a GPU-only optional extra
    from xformers.ops import memory_efficient_attention  # type: ignore  # noqa: F811
except Exception:
    memory_efficient_attention = None


def flash_available() -> bool:
    return flash_attn_func is not None and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def xformers_usable() -> bool:
    """Probe once: an xformers import that succeeds does not mean its kernels run (they refuse CPU)."""
    if memory_efficient_attention is None or not torch.cuda.is_available():
        return False
    try:  # pragma: no cover - needs a GPU
        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
        memory_efficient_attention(q, q, q)
        return True
    except Exception:
        return False


def flash_qualifies(q: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and head_dim <= 256
        and head_dim % 8 == 0
    )


def resolve_backend(name: str) -> str:
    """Validate a requested backend once, at construction; return it (``auto`` stays ``auto``)."""
    if name not in BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not one of {BACKENDS}")
    if name == "flash" and flash_attn_func is None:
        raise RuntimeError(
            "attn_backend='flash' was requested but flash-attn is not importable; install it on a "
            "CUDA machine (pip install 'erw_fast[cuda]', needs nvcc/CUDA_HOME) or use 'auto'/'sdpa'"
        )
    if name == "flash" and not torch.cuda.is_available():
        raise RuntimeError("attn_backend='flash' needs a CUDA device; none is available")
    if name == "xformers" and not xformers_usable():
        why = "not installed" if memory_efficient_attention is None else "installed but its kernel does not run here (no CUDA device or a broken build)"
        raise RuntimeError(f"attn_backend='xformers' was requested but xformers is {why}; use 'auto' or 'sdpa'")
    return name


def math_attention(q, k, v, scale: float):
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v


def sdpa_attention(q, k, v, scale: float):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def flash_attention(q, k, v, scale: float):
    # flash-attn layout: (B, N, H, Dh); non-causal, no dropout.
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=False,
    )
    return out.transpose(1, 2)


def xformers_attention(q, k, v, scale: float):
    # xformers layout: (B, N, H, Dh); no bias, no dropout.
    out = memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
        attn_bias=None, p=0.0, scale=scale,
    )
    return out.transpose(1, 2)


def attention(q, k, v, backend: str, scale: float | None = None, xformers_ok: bool | None = None):
    """Dispatch one attention call. ``backend`` was validated by ``resolve_backend``.

    ``xformers_ok``: the result of ``xformers_usable()`` probed earlier (blocks probe when built, so
    compiled code never runs the probe); None probes here (cached), for direct calls.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "math":
        return math_attention(q, k, v, scale)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, scale)
    if backend == "flash":
        if not flash_qualifies(q):
            raise ValueError(
                f"attn_backend='flash' got inputs it cannot run: device={q.device}, dtype={q.dtype}, "
                f"head_dim={q.shape[-1]} (needs CUDA, fp16/bf16, head_dim <= 256 and a multiple of 8)"
            )
        return flash_attention(q, k, v, scale)
    if backend == "xformers":
        return xformers_attention(q, k, v, scale)
    # auto
    if flash_attn_func is not None and flash_qualifies(q):
        return flash_attention(q, k, v, scale)
    if q.is_cuda and (xformers_usable() if xformers_ok is None else xformers_ok):
        return xformers_attention(q, k, v, scale)
    return sdpa_attention(q, k, v, scale)

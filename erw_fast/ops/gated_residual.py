"""``gated_residual``: ``x + gate[:, None] * y``; x, y (B, T, D), gate (B, D).

Custom ops ``erw_fast::gated_residual`` and ``erw_fast::gated_residual_backward`` (fake impls +
autograd), the public wrapper and the PyTorch reference ``gated_residual_ref``.  Triton kernels:
``erw_fast.kernels.gated_residual``.
"""
from typing import Tuple

import torch
from torch import Tensor

from ._dispatch import _check_backend, _use_triton
from ._dtypes import _compute_dtype, _promote

_OP = "gated_residual"


def gated_residual_ref(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Plain PyTorch reference (autograd, any float dtype; fp32 math unless an input is fp64)."""
    cdt = _compute_dtype(x, gate, y)
    out = x.to(cdt) + gate.to(cdt)[:, None] * y.to(cdt)
    return out.to(_promote(x, gate, y))


@torch.library.custom_op("erw_fast::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, gate: Tensor, y: Tensor, backend: str) -> Tensor:
    out_dtype = _promote(x, gate, y)
    if _use_triton(backend, _OP, x, gate, y):
        from ..kernels.gated_residual import gated_residual_fwd

        return gated_residual_fwd(x, gate, y, out_dtype=out_dtype)
    cdt = _compute_dtype(x, gate, y)
    return (x.to(cdt) + gate.to(cdt)[:, None] * y.to(cdt)).to(out_dtype).contiguous()


@_gated_residual_op.register_fake
def _(x, gate, y, backend):
    return x.new_empty(x.shape, dtype=_promote(x, gate, y))


@torch.library.custom_op("erw_fast::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(dout: Tensor, gate: Tensor, y: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """-> dy (y.dtype), dgate (B, D) in the compute dtype (fp32)."""
    if _use_triton(backend, _OP, dout, gate, y):
        from ..kernels.gated_residual import gated_residual_bwd

        dy, dgate = gated_residual_bwd(dout, gate, y, dy_dtype=y.dtype)
        return dy, dgate.to(_compute_dtype(dout, gate, y))
    cdt = _compute_dtype(dout, gate, y)
    do = dout.to(cdt)
    return (do * gate.to(cdt)[:, None]).to(y.dtype).contiguous(), (do * y.to(cdt)).sum(dim=1).contiguous()


@_gated_residual_bwd_op.register_fake
def _(dout, gate, y, backend):
    B, _, D = y.shape
    return y.new_empty(y.shape), y.new_empty((B, D), dtype=_compute_dtype(dout, gate, y))


def _gres_setup_context(ctx, inputs, output):
    x, gate, y, backend = inputs
    ctx.save_for_backward(gate, y)
    ctx.backend, ctx.x_dtype = backend, x.dtype


def _gres_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dout, gate, y, ctx.backend)
    return dout.to(ctx.x_dtype), dgate.to(gate.dtype), dy, None


_gated_residual_op.register_autograd(_gres_backward, setup_context=_gres_setup_context)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, backend: str = "auto") -> Tensor:
    """``x + gate[:, None] * y``; x, y (B, T, D), gate (B, D)."""
    _check_backend(backend)
    return _gated_residual_op(x, gate, y, backend)

"""``layernorm_modulate``: ``LayerNorm(x, no affine, biased var) * (1 + scale[:, None]) + shift[:, None]``.

x (B, T, D), shift/scale (B, D).  Custom ops ``erw_fast::layernorm_modulate`` and
``erw_fast::layernorm_modulate_backward`` (fake impls + autograd), the public wrapper and the
PyTorch reference ``layernorm_modulate_ref``.  Triton kernels: ``erw_fast.kernels.layernorm_modulate``.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import _check_backend, _use_triton
from ._dtypes import _compute_dtype, _promote

_OP = "layernorm_modulate"


def layernorm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch reference (autograd, any float dtype; fp32 math unless an input is fp64)."""
    cdt = _compute_dtype(x, shift, scale)
    xf = x.to(cdt)
    y = F.layer_norm(xf, (xf.shape[-1],), eps=eps)
    y = y * (1 + scale.to(cdt)[:, None]) + shift.to(cdt)[:, None]
    return y.to(_promote(x, shift, scale))


def _lnmod_stats_torch(xf, eps):
    mean = xf.mean(dim=-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)
    return xc * rstd, rstd


@torch.library.custom_op("erw_fast::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str) -> Tensor:
    out_dtype = _promote(x, shift, scale)
    if _use_triton(backend, _OP, x, shift, scale):
        from ..kernels.layernorm_modulate import layernorm_modulate_fwd

        return layernorm_modulate_fwd(x, shift, scale, eps, out_dtype=out_dtype)
    cdt = _compute_dtype(x, shift, scale)
    xhat, _ = _lnmod_stats_torch(x.to(cdt), eps)
    out = xhat * (1 + scale.to(cdt)[:, None]) + shift.to(cdt)[:, None]
    return out.to(out_dtype).contiguous()  # fake impl promises contiguous outputs


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, backend):
    return x.new_empty(x.shape, dtype=_promote(x, shift, scale))


@torch.library.custom_op("erw_fast::layernorm_modulate_backward", mutates_args=())
def _layernorm_modulate_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, eps: float,
                               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dx (x.dtype), dshift and dscale (B, D) in the compute dtype (fp32)."""
    if _use_triton(backend, _OP, dy, x, scale):
        from ..kernels.layernorm_modulate import layernorm_modulate_bwd

        dx, dshift, dscale = layernorm_modulate_bwd(dy, x, scale, eps, dx_dtype=x.dtype)
        cdt = _compute_dtype(dy, x, scale)  # kernels accumulate in fp32; match the fake impl
        return dx, dshift.to(cdt), dscale.to(cdt)
    cdt = _compute_dtype(dy, x, scale)
    xhat, rstd = _lnmod_stats_torch(x.to(cdt), eps)
    dyf = dy.to(cdt)
    g = dyf * (1 + scale.to(cdt)[:, None])
    dx = rstd * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype).contiguous(), dyf.sum(dim=1).contiguous(), (dyf * xhat).sum(dim=1).contiguous()


@_layernorm_modulate_bwd_op.register_fake
def _(dy, x, scale, eps, backend):
    cdt = _compute_dtype(dy, x, scale)
    B, _, D = x.shape
    return x.new_empty(x.shape), x.new_empty((B, D), dtype=cdt), x.new_empty((B, D), dtype=cdt)


def _lnmod_setup_context(ctx, inputs, output):
    x, shift, scale, eps, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.backend, ctx.shift_dtype = eps, backend, shift.dtype


def _lnmod_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _layernorm_modulate_bwd_op(dy, x, scale, ctx.eps, ctx.backend)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None


_layernorm_modulate_op.register_autograd(_lnmod_backward, setup_context=_lnmod_setup_context)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                       backend: str = "auto") -> Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``; x (B, T, D), shift/scale (B, D)."""
    _check_backend(backend)
    return _layernorm_modulate_op(x, shift, scale, float(eps), backend)

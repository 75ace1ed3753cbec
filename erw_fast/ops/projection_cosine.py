"""``projection_cosine_loss``: REPA's alignment loss fused with the projector's last Linear.

``mean_n -cos(h_n @ weight.T + bias, target_n)``; h (N, K), weight (Z, K), bias (Z,) or None,
target (N, Z) (no grad).  Custom op ``erw_fast::projection_cosine_loss`` (fake impl + autograd), the
public wrapper and the eager REPA formula ``projection_cosine_loss_ref``.  Triton row kernel:
``erw_fast.kernels.projection_cosine``.

Liger-style fused linear loss: rows are processed in chunks of ``chunk_size`` (default so that a
chunk's (rows, max(K, Z)) buffers hold <= 2**24 elements); per chunk ``z = h_c @ W.T + b`` is one matmul,
the per-row loss and ``dL/dz`` come from one kernel (written over z in place), and ``dL/dh_c``,
``dL/dW``, ``dL/db`` are accumulated right away.  The full (N, Z) projection and its normalised
copies never exist; autograd keeps only grad_h (N, K, same size as h), grad_W and grad_b, which the
backward scales by the incoming gradient (in eager mode grad_h is scaled in place and handed on, so
no second (N, K) buffer appears; under torch.compile the scaling is out of place).  Gradients are
only computed when grad mode is on and h, weight or bias requires grad.  The ``"torch"`` backend runs the same chunked algorithm
with a PyTorch row function (memory-lean too); ``projection_cosine_loss_ref`` is the plain eager
REPA formula.  Matmuls run in ``promote_types(h.dtype, weight.dtype)`` (pass a bf16 weight, e.g.
``weight.to(h.dtype)``, to get bf16 tensor-core matmuls); normalisation and the loss are fp32; the
loss is returned in fp32 (fp64 for fp64 inputs); ``target`` gets no gradient.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels as _kernels  # light: no triton import here
from ._dispatch import _check_backend, _use_triton
from ._dtypes import _compute_dtype, _promote

_COS_EPS = 1e-12  # F.normalize's default


def projection_cosine_loss_ref(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor) -> Tensor:
    """REPA: ``z = Linear(h)``; ``-(normalize(z) * normalize(target)).sum(-1)``, mean over rows."""
    mm = _promote(h, weight) if bias is None else _promote(h, weight, bias)
    z = F.linear(h.to(mm), weight.to(mm), None if bias is None else bias.to(mm))
    cdt = _compute_dtype(z, target)
    zn = F.normalize(z.to(cdt), dim=-1)
    tn = F.normalize(target.to(cdt), dim=-1)
    return -(zn * tn).sum(dim=-1).mean()


def _cos_rows_torch(z: Tensor, target: Tensor, weight: float, eps: float = _COS_EPS, dz=None):
    """PyTorch twin of kernels.projection_cosine.cosine_loss_grad_rows."""
    cdt = _compute_dtype(z, target)
    zf, tf = z.to(cdt), target.to(cdt)
    nz = torch.linalg.vector_norm(zf, dim=-1, keepdim=True)
    nt = torch.linalg.vector_norm(tf, dim=-1, keepdim=True)
    zden, tden = nz.clamp_min(eps), nt.clamp_min(eps)
    zn, tn = zf / zden, tf / tden
    cos = (zn * tn).sum(dim=-1, keepdim=True)
    grad = (tn - torch.where(nz > eps, cos, torch.zeros_like(cos)) * zn) / zden * (-weight)
    if dz is None:
        dz = grad.to(z.dtype)
    else:
        dz.copy_(grad)
    return (-cos).sum(), dz


def default_chunk_size(n_rows: int, k: int, z: int) -> int:
    """Rows per chunk: the chunk's (rows, max(K, Z)) buffers hold <= 2**24 elements (8192 rows at
    K = 2048: 8 chunks at N = 65536, few enough that launch overhead stays small)."""
    c = (1 << 24) // max(k, z, 1)
    c = max(64, (c // 64) * 64)
    return max(1, min(n_rows, c))


def _pcl_dtypes(h, weight, bias, target):
    mm = _promote(h, weight) if bias is None else _promote(h, weight, bias)
    acc = torch.float64 if mm == torch.float64 else torch.float32
    loss = torch.float64 if (acc == torch.float64 or target.dtype == torch.float64) else torch.float32
    return mm, acc, loss


def _projection_cosine_chunked(h, weight, bias, target, chunk_size, row_fn, need_grads=True):
    """Chunked loss (+ gradients).  Without ``need_grads`` the grads come back as empty tensors."""
    N, K = h.shape
    Z = weight.shape[0]
    if target.shape != (N, Z) or weight.shape[1] != K or (bias is not None and bias.shape != (Z,)):
        raise ValueError(f"projection_cosine_loss: shapes h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}, target {tuple(target.shape)}")
    mm, acc, loss_dtype = _pcl_dtypes(h, weight, bias, target)
    dev = h.device
    W = weight.to(mm)
    b = None if bias is None else bias.to(mm)
    gb_dtype = weight.dtype if bias is None else bias.dtype
    if need_grads:
        grad_h = _kernels.empty((N, K), h.dtype, dev)
        gW = torch.zeros((Z, K), dtype=acc, device=dev)
        gb = torch.zeros((Z,), dtype=acc, device=dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    if N == 0:
        loss.fill_(float("nan"))
    c = chunk_size if chunk_size and chunk_size > 0 else default_chunk_size(N, K, Z)
    inv_n = 1.0 / max(N, 1)
    for i in range(0, N, c):
        j = min(N, i + c)
        hc = h[i:j].to(mm)
        z = hc @ W.t() if b is None else torch.addmm(b, hc, W.t())
        lsum, dz = row_fn(z, target[i:j], inv_n, dz=z)  # dL/dz written over z
        loss += lsum.to(acc)
        if not need_grads:
            continue
        if h.dtype == mm:
            torch.mm(dz, W, out=grad_h[i:j])
        else:
            grad_h[i:j].copy_(dz @ W)
        if mm == acc:
            gW.addmm_(dz.t(), hc)
        else:
            gW += dz.t() @ hc
        gb += dz.sum(dim=0, dtype=acc)
    loss = (loss * inv_n).to(loss_dtype)
    if not need_grads:
        return (loss, h.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,), dtype=gb_dtype))
    return loss, grad_h, gW.to(weight.dtype), gb.to(gb_dtype)


@torch.library.custom_op("erw_fast::projection_cosine_loss", mutates_args=())
def _projection_cosine_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                          chunk_size: int, need_grads: bool,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, dloss/dh, dloss/dweight, dloss/dbias), all computed chunk by chunk (grads empty
    when ``need_grads`` is False).  Only the loss is differentiable; an eager backward scales the
    returned dloss/dh buffer in place (``projection_cosine_loss`` drops these outputs)."""
    if h.dim() != 2 or weight.dim() != 2 or target.dim() != 2:
        raise ValueError("projection_cosine_loss: h (N, K), weight (Z, K), target (N, Z)")
    if _use_triton(backend, "projection_cosine_loss", h, weight, bias, target):
        from ..kernels.projection_cosine import cosine_loss_grad_rows as row_fn
    else:
        row_fn = _cos_rows_torch
    return _projection_cosine_chunked(h, weight, bias, target, chunk_size, row_fn, need_grads)


@_projection_cosine_op.register_fake
def _(h, weight, bias, target, chunk_size, need_grads, backend):
    _, _, loss_dtype = _pcl_dtypes(h, weight, bias, target)
    gb_dtype = weight.dtype if bias is None else bias.dtype
    loss = h.new_empty((), dtype=loss_dtype)
    if not need_grads:
        return loss, h.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,), dtype=gb_dtype)
    return (loss, h.new_empty(h.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=gb_dtype))


def _pcl_setup_context(ctx, inputs, output):
    h, weight, bias, target, chunk_size, need_grads, backend = inputs
    _, grad_h, grad_w, grad_b = output
    ctx.has_bias = bias is not None
    ctx.need_grads = need_grads
    ctx.applied = None
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)  # only the loss is differentiated
    ctx.save_for_backward(grad_h, grad_w, grad_b)


def _tracing(t: Tensor) -> bool:
    """True under torch.compile / AOT / make_fx tracing (fake, functional or proxied tensors)."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _pcl_backward(ctx, g_loss, _gh, _gw, _gb):
    if not ctx.need_grads:
        raise RuntimeError("projection_cosine_loss was called with no input requiring grad")
    grad_h, grad_w, grad_b = ctx.saved_tensors
    if _tracing(grad_h):
        dh = (grad_h * g_loss).to(grad_h.dtype)
    else:
        # Eager: scale the (N, K) buffer made in the forward in place, so the backward does not
        # hold a second (N, K) tensor (the Liger trick).  ``.data`` keeps autograd's version check
        # quiet; a second backward (retain_graph=True) undoes the previous scale first.
        buf = grad_h.data
        if ctx.applied is None:
            buf.mul_(g_loss)
        else:
            if bool(ctx.applied == 0):
                raise RuntimeError("projection_cosine_loss: a second backward after a zero upstream "
                                   "gradient cannot be reconstructed (the gradient is scaled in place)")
            buf.mul_(g_loss / ctx.applied)
        ctx.applied = g_loss.detach().clone()
        dh = grad_h
    dw = (grad_w * g_loss).to(grad_w.dtype)
    db = (grad_b * g_loss).to(grad_b.dtype) if ctx.has_bias else None
    return dh, dw, db, None, None, None, None


_projection_cosine_op.register_autograd(_pcl_backward, setup_context=_pcl_setup_context)


def projection_cosine_loss(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                           backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """``mean_n -cos(h_n @ weight.T + bias, target_n)`` without materialising the (N, Z) projection.

    h (N, K), weight (Z, K), bias (Z,) or None, target (N, Z) (treated as constant).  Leading
    dimensions of h/target beyond 2 are flattened (mean over all tokens, as REPA with equal token
    counts per sample).  Returns a 0-d fp32 tensor.  Gradients are computed in the forward only
    when grad mode is on and h, weight or bias requires grad.  Under autocast, h/weight/bias are
    cast to the autocast dtype first (as autocast would cast the projector's Linear).
    """
    _check_backend(backend)
    dev_type = h.device.type
    if dev_type in ("cuda", "cpu") and torch.is_autocast_enabled(dev_type):
        # Custom ops bypass autocast; cast like autocast would cast the projector's F.linear, so the
        # matmuls run in the autocast dtype (differentiable casts: grads reach fp32 weights).
        dt = torch.get_autocast_dtype(dev_type)
        h, weight = h.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if h.dim() > 2:
        h = h.reshape(-1, h.shape[-1])
    if target.dim() > 2:
        target = target.reshape(-1, target.shape[-1])
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    loss, _, _, _ = _projection_cosine_op(h, weight, bias, target.detach(), int(chunk_size or 0),
                                          bool(need), backend)
    return loss


# FLOPs as torch.utils.flop_counter counts the unfused path (the projector's last linear: 2NKZ
# forward, 4NKZ backward): a custom op is opaque to the counter, which would count it as 0.
def _pcl_flops(h_shape, weight_shape, bias_shape, target_shape, chunk_size, need_grads, backend, *args, **kwargs):
    n, k = h_shape
    z = weight_shape[0]
    return 2 * n * k * z * (3 if need_grads else 1)


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.erw_fast.projection_cosine_loss)(_pcl_flops)


_register_flops()

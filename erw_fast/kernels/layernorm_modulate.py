"""LayerNorm (no affine) + adaLN modulation, fused: ``LN(x) * (1 + scale[:, None]) + shift[:, None]``.

Shapes: x (B, T, D); shift, scale (B, D).  Arithmetic in fp32 whatever the input dtypes; the output
dtype is chosen by the caller (``out=`` or ``out_dtype``).

Forward: one read of x, one write of out.  Mean and rstd are *not* stored: the backward loads the
whole row of x anyway, so recomputing them in registers is free in bandwidth and saves two outputs.

Backward: dx per row, and dshift / dscale reduced over T deterministically: every program owns a
contiguous range of T for one batch row and writes its fp32 partial sums to
``partial[b, split, D]``; the launcher sums the (small) split axis with ``torch.sum``.  No atomics.
"""
import torch
import triton
import triton.language as tl

from . import count_launch, device_guard, empty, interpret_env, sm_count, split_rows

INTERPRET = interpret_env()  # what triton.jit saw when this module's kernels were defined


@triton.jit
def _lnmod_fwd_kernel(
    X, SHIFT, SCALE, OUT,
    T, D,
    stride_xb, stride_xt,
    stride_shb, stride_scb,
    stride_ob, stride_ot,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + b * stride_xb + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = tl.rsqrt(var + eps)

    sh = tl.load(SHIFT + b * stride_shb + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * stride_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + sc)[None, :] + sh[None, :]
    tl.store(OUT + b * stride_ob + rows64[:, None] * stride_ot + cols[None, :],
             y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _lnmod_bwd_kernel(
    DY, X, SCALE, DX, DSHIFT_P, DSCALE_P,
    T, D, rows_per_split,
    stride_dyb, stride_dyt,
    stride_xb, stride_xt,
    stride_scb,
    stride_dxb, stride_dxt,
    stride_pb, stride_ps,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    sc = tl.load(SCALE + b * stride_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    gain = 1.0 + sc

    acc_dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_start = pid_s * rows_per_split
    for off in range(0, rows_per_split, BLOCK_T):
        rows = t_start + off + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + b * stride_xb + rows64[:, None] * stride_xt + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + b * stride_dyb + rows64[:, None] * stride_dyt + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = tl.rsqrt(var + eps)
        xhat = xc * rstd[:, None]
        g = dy * gain[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + b * stride_dxb + rows64[:, None] * stride_dxt + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)
        acc_dshift += tl.sum(dy, axis=0)
        acc_dscale += tl.sum(dy * xhat, axis=0)

    p_off = b * stride_pb + pid_s * stride_ps + cols
    tl.store(DSHIFT_P + p_off, acc_dshift, mask=cmask)
    tl.store(DSCALE_P + p_off, acc_dscale, mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _tile_config(T, D, device, block_t=None, num_warps=None, backward=False):
    """(BLOCK_T, BLOCK_D, num_warps).  The whole row is one tile (BLOCK_D = next pow2 of D).

    GPU defaults: ~4096-element tiles; forward 8 warps (16 elements per thread per tensor), backward
    16 warps (the backward keeps x, dy, xhat and g live). Compiled ahead of time for SiT-XL/2
    (D = 1152, ``python -m erw_fast.kernels.aot``): forward 32–48 registers (5–8 CTAs per SM),
    backward 59–84 (bf16 and mixed dtypes: 76–84 registers, 1 CTA of 16 warps per SM); no spills.
    Interpreter (CPU): big tiles, so few program instances.
    """
    block_d = triton.next_power_of_2(D)
    if block_t is None:
        target = 4096 if device.type == "cuda" else 32768
        block_t = max(1, min(triton.next_power_of_2(max(T, 1)), target // block_d))
    if num_warps is None:
        per_thread = 8 if backward else 16
        num_warps = max(4, min(16, triton.next_power_of_2(block_t * block_d // (32 * per_thread))))
    return block_t, block_d, num_warps


def layernorm_modulate_fwd(x, shift, scale, eps=1e-6, out=None, out_dtype=None,
                           block_t=None, num_warps=None):
    """Launch the forward kernel.  Returns ``out`` (B, T, D) in ``out_dtype`` (default x.dtype)."""
    assert x.dim() == 3 and shift.dim() == 2 and scale.dim() == 2, "x (B,T,D), shift/scale (B,D)"
    B, T, D = x.shape
    assert shift.shape == (B, D) and scale.shape == (B, D), (x.shape, shift.shape, scale.shape)
    x = _last_dim_contiguous(x)
    shift = _last_dim_contiguous(shift)
    scale = _last_dim_contiguous(scale)
    if out is None:
        out = empty((B, T, D), out_dtype or x.dtype, x.device)
    assert out.shape == (B, T, D) and out.stride(-1) == 1
    if x.numel() == 0:
        return out
    block_t, block_d, nw = _tile_config(T, D, x.device, block_t, num_warps)
    grid = (triton.cdiv(T, block_t), B)
    with device_guard(out):
        _lnmod_fwd_kernel[grid](
            x, shift, scale, out, T, D,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), out.stride(0), out.stride(1),
            float(eps), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=nw,
        )
    count_launch("layernorm_modulate_fwd")
    return out


def _splits_for_sms(B, T, block_t, sms):
    """T-splits per batch row on a CUDA device with ``sms`` SMs: ~4 programs per SM in all."""
    return max(1, min(triton.cdiv(T, block_t), triton.cdiv(4 * sms, max(B, 1))))


def _num_splits(B, T, block_t, device):
    if device.type == "cuda":
        return _splits_for_sms(B, T, block_t, sm_count(device))
    return 1  # interpreter: one program per batch row


def cuda_launch_config(B, T, D, sms, backward=False):
    """What the launchers pick by default on a CUDA device with ``sms`` SMs (no device needed).

    -> dict(BLOCK_T, BLOCK_D, num_warps, grid) plus ``rows_per_split`` for the backward; used by
    ``erw_fast.kernels.aot`` to compile the kernels ahead of time exactly as they are launched.
    """
    block_t, block_d, nw = _tile_config(T, D, torch.device("cuda"), backward=backward)
    cfg = dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=nw, grid=(triton.cdiv(T, block_t), B))
    if backward:
        rows_per_split, splits = split_rows(T, _splits_for_sms(B, T, block_t, sms), block_t)
        cfg.update(grid=(splits, B), rows_per_split=rows_per_split)
    return cfg


def layernorm_modulate_bwd(dy, x, scale, eps=1e-6, dx=None, dx_dtype=None, splits=None,
                           block_t=None, num_warps=None):
    """Launch the backward kernel.

    Returns ``(dx, dshift, dscale)``: dx (B, T, D) in ``dx_dtype`` (default x.dtype); dshift and
    dscale (B, D) in fp32 (the caller casts).  The reduction over T is deterministic.
    """
    B, T, D = x.shape
    assert dy.shape == (B, T, D) and scale.shape == (B, D)
    x = _last_dim_contiguous(x)
    dy = _last_dim_contiguous(dy)
    scale = _last_dim_contiguous(scale)
    if dx is None:
        dx = empty((B, T, D), dx_dtype or x.dtype, x.device)
    assert dx.shape == (B, T, D) and dx.stride(-1) == 1
    if x.numel() == 0:
        z = torch.zeros((B, D), dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    block_t, block_d, nw = _tile_config(T, D, x.device, block_t, num_warps, backward=True)
    if splits is None:
        splits = _num_splits(B, T, block_t, x.device)
    rows_per_split, splits = split_rows(T, splits, block_t)
    dshift_p = empty((B, splits, D), torch.float32, x.device)
    dscale_p = empty((B, splits, D), torch.float32, x.device)
    with device_guard(dx):
        _lnmod_bwd_kernel[(splits, B)](
            dy, x, scale, dx, dshift_p, dscale_p,
            T, D, rows_per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), scale.stride(0),
            dx.stride(0), dx.stride(1), dshift_p.stride(0), dshift_p.stride(1),
            float(eps), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=nw,
        )
    count_launch("layernorm_modulate_bwd")
    if splits == 1:
        return dx, dshift_p.view(B, D), dscale_p.view(B, D)
    # deterministic second-stage reduction over the (few) splits
    return dx, dshift_p.sum(dim=1), dscale_p.sum(dim=1)

"""Gated residual, fused: ``out = x + gate[:, None] * y``.

Shapes: x, y (B, T, D); gate (B, D).  Arithmetic in fp32; output dtype chosen by the caller.

Backward: ``dx = dout`` (the caller just casts / reuses dout), ``dy = dout * gate`` and
``dgate = sum_T dout * y``.  One kernel produces dy and the per-(batch, T-split) fp32 partial sums
of dgate; the launcher sums the split axis with ``torch.sum`` — deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from . import count_launch, device_guard, empty, interpret_env, sm_count, split_rows

INTERPRET = interpret_env()  # what triton.jit saw when this module's kernels were defined


@triton.jit
def _gres_fwd_kernel(
    X, GATE, Y, OUT,
    T, D,
    stride_xb, stride_xt, stride_gb, stride_yb, stride_yt, stride_ob, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < T)[:, None] & cmask[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yt + cols[None, :], mask=mask, other=0.0)
    g = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    out = x.to(tl.float32) + g[None, :] * y.to(tl.float32)
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gres_bwd_kernel(
    DOUT, GATE, Y, DY, DGATE_P,
    T, D, rows_per_split,
    stride_db, stride_dt, stride_gb, stride_yb, stride_yt, stride_dyb, stride_dyt,
    stride_pb, stride_ps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_start = pid_s * rows_per_split
    for off in range(0, rows_per_split, BLOCK_T):
        rows = (t_start + off + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (rows < T)[:, None] & cmask[None, :]
        do = tl.load(DOUT + b * stride_db + rows[:, None] * stride_dt + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yt + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + b * stride_dyb + rows[:, None] * stride_dyt + cols[None, :],
                 (do * g[None, :]).to(DY.dtype.element_ty), mask=mask)
        acc += tl.sum(do * y, axis=0)
    tl.store(DGATE_P + b * stride_pb + pid_s * stride_ps + cols, acc, mask=cmask)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _pick_block_d(D, device):
    if device.type != "cuda":
        return min(triton.next_power_of_2(D), 4096)
    # largest power of two with little padding (D = 1152 -> 256: 5 column blocks, 11% padded)
    for bd in (1024, 512, 256):
        if triton.cdiv(D, bd) * bd - D <= D // 8:
            return bd
    return 128


def _tile_config(T, D, device, block_t=None, block_d=None, num_warps=None):
    if block_d is None:
        block_d = _pick_block_d(D, device)
    if block_t is None:
        target = 4096 if device.type == "cuda" else 32768
        block_t = max(1, min(triton.next_power_of_2(max(T, 1)), target // block_d))
    if num_warps is None:
        num_warps = 4 if block_t * block_d <= 2048 else 8
    return block_t, block_d, num_warps


def _splits_for_sms(B, T, block_t, n_d, sms):
    """T-splits of the backward on a CUDA device with ``sms`` SMs: ~4 programs per SM in all."""
    return max(1, min(triton.cdiv(T, block_t), triton.cdiv(4 * sms, B * n_d)))


def cuda_launch_config(B, T, D, sms, backward=False):
    """What the launchers pick by default on a CUDA device with ``sms`` SMs (no device needed).

    -> dict(BLOCK_T, BLOCK_D, num_warps, grid) plus ``rows_per_split`` for the backward; used by
    ``erw_fast.kernels.aot`` to compile the kernels ahead of time exactly as they are launched.
    """
    bt, bd, nw = _tile_config(T, D, torch.device("cuda"))
    n_d = triton.cdiv(D, bd)
    cfg = dict(BLOCK_T=bt, BLOCK_D=bd, num_warps=nw, grid=(triton.cdiv(T, bt), n_d, B))
    if backward:
        rows_per_split, splits = split_rows(T, _splits_for_sms(B, T, bt, n_d, sms), bt)
        cfg.update(grid=(splits, n_d, B), rows_per_split=rows_per_split)
    return cfg


def gated_residual_fwd(x, gate, y, out=None, out_dtype=None, block_t=None, block_d=None,
                       num_warps=None):
    """Launch the forward kernel; returns ``out = x + gate[:, None] * y`` (B, T, D)."""
    assert x.dim() == 3 and y.shape == x.shape and gate.dim() == 2
    B, T, D = x.shape
    assert gate.shape == (B, D), (x.shape, gate.shape)
    x, y, gate = _last_dim_contiguous(x), _last_dim_contiguous(y), _last_dim_contiguous(gate)
    if out is None:
        out = empty((B, T, D), out_dtype or x.dtype, x.device)
    assert out.shape == (B, T, D) and out.stride(-1) == 1
    if x.numel() == 0:
        return out
    bt, bd, nw = _tile_config(T, D, x.device, block_t, block_d, num_warps)
    grid = (triton.cdiv(T, bt), triton.cdiv(D, bd), B)
    with device_guard(out):
        _gres_fwd_kernel[grid](
            x, gate, y, out, T, D,
            x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_T=bt, BLOCK_D=bd, num_warps=nw,
        )
    count_launch("gated_residual_fwd")
    return out


def gated_residual_bwd(dout, gate, y, dy=None, dy_dtype=None, splits=None, block_t=None,
                       block_d=None, num_warps=None):
    """Launch the backward kernel; returns ``(dy, dgate)`` with dgate (B, D) in fp32."""
    B, T, D = y.shape
    assert dout.shape == (B, T, D) and gate.shape == (B, D)
    dout, y, gate = _last_dim_contiguous(dout), _last_dim_contiguous(y), _last_dim_contiguous(gate)
    if dy is None:
        dy = empty((B, T, D), dy_dtype or y.dtype, y.device)
    assert dy.shape == (B, T, D) and dy.stride(-1) == 1
    if y.numel() == 0:
        return dy, torch.zeros((B, D), dtype=torch.float32, device=y.device)
    bt, bd, nw = _tile_config(T, D, y.device, block_t, block_d, num_warps)
    n_d = triton.cdiv(D, bd)
    if splits is None:
        splits = _splits_for_sms(B, T, bt, n_d, sm_count(y.device)) if y.device.type == "cuda" else 1
    rows_per_split, splits = split_rows(T, splits, bt)
    part = empty((B, splits, D), torch.float32, y.device)
    with device_guard(dy):
        _gres_bwd_kernel[(splits, n_d, B)](
            dout, gate, y, dy, part,
            T, D, rows_per_split,
            dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
            dy.stride(0), dy.stride(1), part.stride(0), part.stride(1),
            BLOCK_T=bt, BLOCK_D=bd, num_warps=nw,
        )
    count_launch("gated_residual_bwd")
    dgate = part.view(B, D) if splits == 1 else part.sum(dim=1)
    return dy, dgate

"""Per-row negative cosine similarity, forward and gradient in one pass.

Used by the chunked fused projection + cosine loss (``erw_fast.ops.projection_cosine_loss``): for a
chunk of projected rows ``z`` (R, Z) and targets ``t`` (R, Z) the kernel computes, in fp32,

    loss_r = -cos(z_r, t_r) = -<z_r / max(|z_r|, eps), t_r / max(|t_r|, eps)>      (F.normalize)
    dz_r   = weight * d loss_r / d z_r
           = -weight * (tn_r - [|z_r| > eps] * cos_r * zn_r) / max(|z_r|, eps)

and writes ``dz`` (may be the same buffer as ``z``: each row is fully loaded before it is written)
plus one fp32 partial loss sum per program (summed by the caller: deterministic).
"""
import torch
import triton
import triton.language as tl

from . import count_launch, device_guard, empty, interpret_env, sm_count

INTERPRET = interpret_env()  # what triton.jit saw when this module's kernels were defined


@triton.jit
def _cos_loss_grad_kernel(
    Z, TGT, DZ, LOSS_P,
    R, NZ,
    stride_z, stride_t, stride_dz,
    weight, eps,
    BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_Z)
    rmask = rows < R
    mask = rmask[:, None] & (cols < NZ)[None, :]
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(TGT + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    nz = tl.sqrt(tl.sum(z * z, axis=1))
    nt = tl.sqrt(tl.sum(t * t, axis=1))
    dz_den = tl.maximum(nz, eps)
    dt_den = tl.maximum(nt, eps)
    zn = z / dz_den[:, None]
    tn = t / dt_den[:, None]
    cos = tl.sum(zn * tn, axis=1)
    c_eff = tl.where(nz > eps, cos, 0.0)
    grad = -(tn - c_eff[:, None] * zn) / dz_den[:, None] * weight
    tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], grad.to(DZ.dtype.element_ty), mask=mask)
    loss = tl.sum(tl.where(rmask, -cos, 0.0), axis=0)
    tl.store(LOSS_P + pid, loss)


MAX_Z = 16384  # one row must fit a tile


def _tile_config(R, NZ, device, block_r=None, num_warps=None):
    """(BLOCK_R, BLOCK_Z, num_warps): whole rows per tile, ~4096-element tiles on a GPU."""
    block_z = triton.next_power_of_2(NZ)
    if block_r is None:
        target_elems = 4096 if device.type == "cuda" else 32768
        block_r = max(1, min(triton.next_power_of_2(R), target_elems // block_z))
    if num_warps is None:
        num_warps = 4 if block_r * block_z <= 2048 else 8
    return block_r, block_z, num_warps


def cuda_launch_config(R, NZ):
    """What ``cosine_loss_grad_rows`` picks by default for an (R, NZ) chunk on a CUDA device (no
    device needed) -> dict(BLOCK_R, BLOCK_Z, num_warps, grid); used by ``erw_fast.kernels.aot``."""
    block_r, block_z, nw = _tile_config(R, NZ, torch.device("cuda"))
    return dict(BLOCK_R=block_r, BLOCK_Z=block_z, num_warps=nw, grid=(triton.cdiv(R, block_r),))


def cosine_loss_grad_rows(z, target, weight, eps=1e-12, dz=None, block_r=None, num_warps=None):
    """Rows of ``z``/``target`` (R, Z) -> (sum_r -cos_r as a 0-d fp32 tensor, dz).

    ``dz = weight * d(-cos_r)/dz_r`` is written into ``dz`` (default: a new tensor like ``z``);
    passing ``dz=z`` overwrites z in place.
    """
    assert z.dim() == 2 and target.shape == z.shape
    R, NZ = z.shape
    if NZ > MAX_Z:
        raise ValueError(f"projection dim {NZ} > {MAX_Z} is not supported by the row kernel")
    if z.stride(-1) != 1:
        z = z.contiguous()
    if target.stride(-1) != 1:
        target = target.contiguous()
    if dz is None:
        dz = empty(z.shape, z.dtype, z.device)
    assert dz.shape == z.shape and dz.stride(-1) == 1
    if R == 0:
        return torch.zeros((), dtype=torch.float32, device=z.device), dz
    block_r, block_z, num_warps = _tile_config(R, NZ, z.device, block_r, num_warps)
    n_prog = triton.cdiv(R, block_r)
    loss_p = empty((n_prog,), torch.float32, z.device)
    with device_guard(dz):
        _cos_loss_grad_kernel[(n_prog,)](
            z, target, dz, loss_p, R, NZ,
            z.stride(0), target.stride(0), dz.stride(0),
            float(weight), float(eps),
            BLOCK_R=block_r, BLOCK_Z=block_z, num_warps=num_warps,
        )
    count_launch("cosine_loss_grad_rows")
    return loss_p.sum(), dz

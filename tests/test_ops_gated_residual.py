"""erw_fast.ops.gated_residual: Triton kernels (interpreter on CPU) vs a float64 reference."""
import pytest
import torch

import erw_fast.kernels as K
import erw_fast.ops as ops
from erw_fast.ops import _dispatch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(out, ref):
    assert out.shape == ref.shape
    out = out.double()
    assert torch.isfinite(out).all(), "non-finite element (unwritten / NaN-poisoned?)"
    return ((out - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(K, "POISON", True)


DTYPES = {  # (x, gate, y)
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 residual, bf16 branch
}


def _inputs(B, T, D, xdt, gdt, ydt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(DEV, xdt)
    ada = torch.randn(B, 6 * D, generator=g).to(DEV, gdt)
    gate = ada.chunk(6, dim=1)[2]  # strided view
    y = torch.randn(B, T, D, generator=g).to(DEV, ydt)
    dout = torch.randn(B, T, D, generator=g).to(DEV, torch.promote_types(torch.promote_types(xdt, gdt), ydt))
    return x, gate, y, dout


def _check(x, gate, y, dout, backend):
    ins = [t.detach().requires_grad_() for t in (x, gate, y)]
    out = ops.gated_residual(*ins, backend=backend)
    grads = torch.autograd.grad(out, ins, dout)
    ins64 = [t.detach().double().requires_grad_() for t in (x, gate, y)]
    ref = ops.gated_residual_ref(*ins64)
    ref_grads = torch.autograd.grad(ref, ins64, dout.double())
    assert out.dtype == torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
    assert rel(out, ref) < TOL[out.dtype], rel(out, ref)
    for name, g, r, inp in zip(("dx", "dgate", "dy"), grads, ref_grads, ins):
        assert g.dtype == inp.dtype, name
        assert rel(g, r) < TOL[g.dtype], (name, rel(g, r))


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("B,T,D", [(2, 17, 1000), (1, 1, 1152), (2, 256, 216), (3, 5, 72)])
def test_triton_matches_float64_reference(B, T, D, dt):
    x, gate, y, dout = _inputs(B, T, D, *DTYPES[dt])
    before = dict(K.LAUNCHES)
    _check(x, gate, y, dout, "triton")
    assert K.LAUNCHES["gated_residual_fwd"] == before.get("gated_residual_fwd", 0) + 1
    assert K.LAUNCHES["gated_residual_bwd"] == before.get("gated_residual_bwd", 0) + 1


def test_noncontiguous_inputs():
    x, gate, y, dout = _inputs(2, 9, 144, torch.float32, torch.float32, torch.float32, seed=1)
    yt = y.transpose(1, 2).contiguous().transpose(1, 2)
    xs = torch.cat([x, x], dim=1)[:, ::2]  # stride over T
    _check(xs, gate, yt, dout, "triton")


@pytest.mark.parametrize("dt", ["fp32", "mixed"])
def test_torch_backend_matches_reference(dt):
    x, gate, y, dout = _inputs(2, 17, 1000, *DTYPES[dt], seed=2)
    before = dict(K.LAUNCHES)
    _check(x, gate, y, dout, "torch")
    assert K.LAUNCHES == before


def test_backward_split_reduction_is_deterministic_and_correct():
    from erw_fast.kernels.gated_residual import gated_residual_bwd

    x, gate, y, dout = _inputs(2, 37, 300, torch.float32, torch.float32, torch.float32, seed=3)
    rdy = dout.double() * gate.double()[:, None]
    rdg = (dout.double() * y.double()).sum(1)
    res = []
    for _ in range(2):
        dy, dg = gated_residual_bwd(dout, gate, y, splits=3, block_t=4, block_d=128)
        assert rel(dy, rdy) < 1e-6 and rel(dg, rdg) < 1e-5
        res.append((dy, dg))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_launcher_multi_tile_writes_every_element():
    from erw_fast.kernels.gated_residual import gated_residual_fwd

    x, gate, y, _ = _inputs(2, 17, 1000, torch.float32, torch.float32, torch.float32, seed=4)
    out = torch.full_like(x, float("nan"))
    gated_residual_fwd(x, gate, y, out=out, block_t=8, block_d=256)
    assert rel(out, x.double() + gate.double()[:, None] * y.double()) < 1e-6


@pytest.mark.skipif(DEV != "cpu", reason="interpreter check only matters on CPU")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    x, gate, y, _ = _inputs(1, 3, 72, torch.float32, torch.float32, torch.float32)
    monkeypatch.setattr(_dispatch, "_interpreter_enabled", lambda op: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.gated_residual(x, gate, y, backend="triton")

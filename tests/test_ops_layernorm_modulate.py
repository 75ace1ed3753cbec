"""erw_fast.ops.layernorm_modulate: Triton kernels (interpreter on CPU) vs a float64 reference."""
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
    monkeypatch.setattr(K, "POISON", True)  # every launcher buffer starts as NaN


DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16),  # fp32 residual stream, bf16 adaLN outputs
}


def _inputs(B, T, D, xdt, mdt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, D, generator=g) * 2 + 0.5).to(DEV, xdt)
    ada = (torch.randn(B, 6 * D, generator=g) * 0.5).to(DEV, mdt)
    shift, scale = ada.chunk(6, dim=1)[:2]  # strided views, as in adaLN
    dy = torch.randn(B, T, D, generator=g).to(DEV, torch.promote_types(xdt, mdt))
    return x, shift, scale, dy


def _ref(x, shift, scale, dy, eps=1e-6):
    x64, sh64, sc64 = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    out = ops.layernorm_modulate_ref(x64, sh64, sc64, eps)
    grads = torch.autograd.grad(out, (x64, sh64, sc64), dy.double())
    return out, grads


def _check(x, shift, scale, dy, backend, eps=1e-6):
    x, shift, scale = [t.detach().requires_grad_() for t in (x, shift, scale)]
    out = ops.layernorm_modulate(x, shift, scale, eps=eps, backend=backend)
    grads = torch.autograd.grad(out, (x, shift, scale), dy)
    ref, ref_grads = _ref(x, shift, scale, dy, eps)
    assert out.dtype == torch.promote_types(x.dtype, shift.dtype)
    assert rel(out, ref) < TOL[out.dtype], rel(out, ref)
    for name, g, r, inp in zip(("dx", "dshift", "dscale"), grads, ref_grads, (x, shift, scale)):
        assert g.dtype == inp.dtype, name
        assert rel(g, r) < TOL[g.dtype], (name, rel(g, r))


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("B,T,D", [(2, 17, 1000), (1, 1, 1152), (2, 256, 216), (3, 5, 72)])
def test_triton_matches_float64_reference(B, T, D, dt):
    x, shift, scale, dy = _inputs(B, T, D, *DTYPES[dt])
    before = dict(K.LAUNCHES)
    _check(x, shift, scale, dy, "triton")
    assert K.LAUNCHES["layernorm_modulate_fwd"] == before.get("layernorm_modulate_fwd", 0) + 1
    assert K.LAUNCHES["layernorm_modulate_bwd"] == before.get("layernorm_modulate_bwd", 0) + 1


def test_noncontiguous_x_and_eps():
    x, shift, scale, dy = _inputs(2, 9, 144, torch.float32, torch.float32, seed=1)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, D) view with stride(-1) != 1
    assert not xt.is_contiguous()
    _check(xt, shift, scale, dy, "triton", eps=1e-3)


@pytest.mark.parametrize("dt", ["fp32", "mixed"])
def test_torch_backend_matches_reference(dt):
    x, shift, scale, dy = _inputs(2, 17, 1000, *DTYPES[dt], seed=2)
    before = dict(K.LAUNCHES)
    _check(x, shift, scale, dy, "torch")
    assert K.LAUNCHES == before  # no kernel ran


@pytest.mark.skipif(DEV != "cpu", reason="CPU semantics of backend='auto'")
def test_auto_on_cpu_uses_reference():
    x, shift, scale, dy = _inputs(1, 3, 72, torch.float32, torch.float32)
    before = dict(K.LAUNCHES)
    out = ops.layernorm_modulate(x, shift, scale)
    assert K.LAUNCHES == before
    torch.testing.assert_close(out, ops.layernorm_modulate_ref(x, shift, scale))


def test_backward_split_reduction_is_deterministic_and_correct():
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd

    x, shift, scale, dy = _inputs(2, 37, 200, torch.float32, torch.float32, seed=3)
    _, (rdx, _, rdsc) = _ref(x, shift, scale, dy)
    rdsh = dy.double().sum(1)
    results = []
    for _ in range(2):
        dx, dsh, dsc = layernorm_modulate_bwd(dy, x, scale, 1e-6, splits=3, block_t=4)
        assert rel(dx, rdx) < 1e-5 and rel(dsh, rdsh) < 1e-5 and rel(dsc, rdsc) < 1e-5
        results.append((dx, dsh, dsc))
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bitwise: no atomics


def test_launcher_writes_every_element():
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_fwd

    x, shift, scale, _ = _inputs(2, 17, 1000, torch.float32, torch.float32, seed=4)
    out = torch.full_like(x, float("nan"))
    layernorm_modulate_fwd(x, shift, scale, 1e-6, out=out, block_t=4)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(DEV != "cpu", reason="interpreter check only matters on CPU")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    x, shift, scale, _ = _inputs(1, 3, 72, torch.float32, torch.float32)
    monkeypatch.setattr(_dispatch, "_interpreter_enabled", lambda op: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.layernorm_modulate(x, shift, scale, backend="triton")


def test_triton_unavailable_raises_and_auto_falls_back(monkeypatch):
    x, shift, scale, _ = _inputs(1, 3, 72, torch.float32, torch.float32)
    monkeypatch.setattr(_dispatch, "_TRITON_OK", False)
    assert not ops.triton_available()
    with pytest.raises(RuntimeError, match="not importable"):
        ops.layernorm_modulate(x, shift, scale, backend="triton")
    ops.layernorm_modulate(x, shift, scale, backend="auto")


def test_bad_backend():
    x, shift, scale, _ = _inputs(1, 3, 72, torch.float32, torch.float32)
    with pytest.raises(ValueError):
        ops.layernorm_modulate(x, shift, scale, backend="cuda")

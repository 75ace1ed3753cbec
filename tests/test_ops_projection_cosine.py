"""erw_fast.ops.projection_cosine_loss: chunked fused linear + cosine loss vs a float64 reference."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import erw_fast.kernels as K
import erw_fast.ops as ops
from erw_fast.ops import _dispatch
from erw_fast.ops.projection_cosine import _cos_rows_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def rel(out, ref):
    assert out.shape == ref.shape
    out = out.double()
    assert torch.isfinite(out).all(), "non-finite element (unwritten / NaN-poisoned?)"
    return ((out - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(K, "POISON", True)


DTYPES = {  # (h, weight, bias, target)
    "fp32": (torch.float32,) * 4,
    "bf16": (torch.bfloat16,) * 4,
    "mixed": (torch.bfloat16, torch.float32, torch.float32, torch.float32),
}


def _inputs(N, K_, Z, hdt, wdt, bdt, tdt, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, K_, generator=g)
    w = torch.randn(Z, K_, generator=g) / K_ ** 0.5
    b = torch.randn(Z, generator=g) * 0.1
    z = h @ w.T + b
    target = z + 0.7 * torch.randn(N, Z, generator=g) * z.std()  # correlated, like a trained projector
    return (h.to(DEV, hdt), w.to(DEV, wdt), b.to(DEV, bdt) if bias else None, target.to(DEV, tdt))


def _reference(h, w, b, target):
    ins = [t.detach().double().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    loss = ops.projection_cosine_loss_ref(ins[0], ins[1], ins[2] if b is not None else None, target.double())
    return loss, torch.autograd.grad(loss * 3.0, ins)


def _check(h, w, b, target, backend, chunk_size=None):
    ins = [t.detach().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    loss = ops.projection_cosine_loss(ins[0], ins[1], ins[2] if b is not None else None, target,
                                      backend=backend, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 3.0, ins)  # upstream gradient != 1 is applied
    ref, ref_grads = _reference(h, w, b, target)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel(loss, ref) < TOL[max(h.dtype, w.dtype, key=lambda d: TOL[d])], (loss.item(), ref.item())
    for name, g, r, inp in zip(("dh", "dweight", "dbias"), grads, ref_grads, ins):
        assert g.dtype == inp.dtype, name
        tol = TOL[torch.bfloat16] if torch.bfloat16 in (h.dtype, w.dtype) else TOL[g.dtype]
        assert rel(g, r) < tol, (name, rel(g, r))


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("N,K_,Z,chunk", [(300, 96, 100, 128), (257, 2048, 768, None), (17, 96, 768, 5)])
def test_triton_matches_float64_reference(N, K_, Z, chunk, dt):
    h, w, b, t = _inputs(N, K_, Z, *DTYPES[dt])
    before = K.LAUNCHES.get("cosine_loss_grad_rows", 0)
    _check(h, w, b, t, "triton", chunk)
    n_chunks = -(-N // (chunk or ops.default_chunk_size(N, K_, Z)))
    assert K.LAUNCHES["cosine_loss_grad_rows"] == before + n_chunks


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_bias_zero_rows_and_3d_input(backend):
    h, w, _, t = _inputs(40, 96, 100, *DTYPES["fp32"], seed=1, bias=False)
    h[3] = 0.0  # z row == 0: F.normalize's eps branch
    t[5] = 0.0  # zero target row
    _check(h, w, None, t, backend, chunk_size=16)
    # (B, T, K) tokens: mean over all tokens
    loss3 = ops.projection_cosine_loss(h.view(4, 10, 96), w, None, t.view(4, 10, 100), backend=backend)
    torch.testing.assert_close(loss3, ops.projection_cosine_loss_ref(h, w, None, t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dt", ["fp32", "mixed"])
def test_torch_backend_matches_reference(dt):
    h, w, b, t = _inputs(300, 96, 100, *DTYPES[dt], seed=2)
    before = dict(K.LAUNCHES)
    _check(h, w, b, t, "torch", chunk_size=64)
    assert K.LAUNCHES == before


def test_float64_torch_backend_exact():
    h, w, b, t = _inputs(50, 32, 24, *(torch.float64,) * 4, seed=3)
    ins = [x.detach().requires_grad_() for x in (h, w, b)]
    loss = ops.projection_cosine_loss(*ins, t, backend="torch", chunk_size=7)
    assert loss.dtype == torch.float64
    ref, ref_grads = _reference(h, w, b, t)
    assert rel(loss, ref) < 1e-12
    for g, r in zip(torch.autograd.grad(loss * 3.0, ins), ref_grads):
        assert rel(g, r) < 1e-12


def test_row_kernel_in_place_and_multi_program():
    from erw_fast.kernels.projection_cosine import cosine_loss_grad_rows

    g = torch.Generator().manual_seed(4)
    z = torch.randn(37, 100, generator=g).to(DEV)
    t = torch.randn(37, 100, generator=g).to(DEV)
    ref_loss, ref_dz = _cos_rows_torch(z.double(), t.double(), 0.5)
    loss, dz = cosine_loss_grad_rows(z.clone(), t, 0.5, block_r=4)  # 10 programs, new dz buffer
    assert rel(loss, ref_loss) < 1e-6 and rel(dz, ref_dz) < 1e-6
    zz = z.clone()
    loss2, dz2 = cosine_loss_grad_rows(zz, t, 0.5, dz=zz, block_r=8)  # in place
    assert dz2.data_ptr() == zz.data_ptr() and torch.equal(loss, loss2) and rel(dz2, ref_dz) < 1e-6


# ------------------------------------------------------------------------------------------------
# memory: nothing of size (N, Z) is saved or allocated; per-op allocations are bounded by the chunk
# ------------------------------------------------------------------------------------------------
def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_tensors_do_not_scale_with_n_times_z(backend):
    N, K_, Z = 1024, 16, 512  # N*Z >> N*K so an (N, Z) tensor would stand out
    h, w, b, t = _inputs(N, K_, Z, *DTYPES["fp32"], seed=5)
    h, w, b = [x.requires_grad_() for x in (h, w, b)]
    loss, sizes = _saved_numels(lambda: ops.projection_cosine_loss(h, w, b, t, backend=backend, chunk_size=128))
    assert sorted(sizes) == sorted([N * K_, Z * K_, Z])  # grad_h, grad_W, grad_b only
    loss.backward()
    _, ref_sizes = _saved_numels(lambda: ops.projection_cosine_loss_ref(h, w, b, t))
    assert max(ref_sizes) >= N * Z  # the eager reference does hold (N, Z) tensors


@pytest.mark.skipif(DEV != "cpu", reason="CPU profiler memory accounting")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_allocations_bounded_by_chunk(backend):
    K_, Z, chunk = 16, 256, 128
    chunk_bytes = chunk * max(K_, Z) * 4
    peaks = {}
    for N in (1024, 4096):
        h, w, b, t = _inputs(N, K_, Z, *DTYPES["fp32"], seed=6)
        h, w, b = [x.requires_grad_() for x in (h, w, b)]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ops.projection_cosine_loss(h, w, b, t, backend=backend, chunk_size=chunk).backward()
        allocs = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
        grad_h_bytes = N * K_ * 4
        # grad_h (and its scaled copy in backward) is the only allocation that grows with N
        others = [a for a in allocs if a != grad_h_bytes]
        peaks[N] = max(others)
        assert peaks[N] <= chunk_bytes, (N, peaks[N], chunk_bytes)
        assert N * Z * 4 > chunk_bytes
    assert peaks[1024] == peaks[4096]


def test_default_chunk_is_bounded():
    c = ops.default_chunk_size(65536, 2048, 768)
    assert 64 <= c <= 8192 and c * 2048 <= 1 << 24
    assert ops.default_chunk_size(10, 2048, 768) == 10


@pytest.mark.skipif(DEV != "cpu", reason="interpreter check only matters on CPU")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    h, w, b, t = _inputs(8, 16, 8, *DTYPES["fp32"])
    monkeypatch.setattr(_dispatch, "_interpreter_enabled", lambda op: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.projection_cosine_loss(h, w, b, t, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_twice_with_retain_graph(backend):
    """The eager backward scales grad_h in place; a second backward must still be right."""
    h, w, b, t = _inputs(40, 32, 24, *DTYPES["fp32"], seed=7)
    h, w, b = [x.requires_grad_() for x in (h, w, b)]
    loss = ops.projection_cosine_loss(h, w, b, t, backend=backend, chunk_size=16)
    g1 = torch.autograd.grad(loss * 2.0, (h, w, b), retain_graph=True)
    g1 = [g.clone() for g in g1]
    g2 = torch.autograd.grad(loss * -0.5, (h, w, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(c, a * -0.25, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_grad_forward_skips_gradients(backend):
    h, w, b, t = _inputs(40, 32, 24, *DTYPES["fp32"], seed=8)
    with torch.no_grad():
        loss, sizes = _saved_numels(lambda: ops.projection_cosine_loss(h, w, b, t, backend=backend))
    assert sizes == [] and not loss.requires_grad
    assert rel(loss, ops.projection_cosine_loss_ref(h.double(), w.double(), b.double(), t.double())) < 1e-5


def test_autocast_casts_like_the_linear_layer():
    """Under autocast the matmuls run in the autocast dtype, as REPA's projector Linear would."""
    h, w, b, t = _inputs(64, 32, 24, *DTYPES["fp32"], seed=9)
    h, w, b = [x.requires_grad_() for x in (h, w, b)]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss = ops.projection_cosine_loss(h, w, b, t, backend="triton")
        ref = ops.projection_cosine_loss_ref(h, w, b, t)
    assert loss.dtype == torch.float32
    g = torch.autograd.grad(loss, (h, w, b))
    gr = torch.autograd.grad(ref, (h, w, b))
    assert rel(loss, ref) < 1e-2
    for a, r in zip(g, gr):
        assert a.dtype == torch.float32 and rel(a, r) < 2e-2


@pytest.mark.parametrize("need_grad", [True, False])
def test_flop_counter_counts_the_fused_loss_like_the_reference(need_grad):
    """FlopCounterMode saw the custom op as 0 FLOPs; warmup_cost and every FLOP ratio on CUDA (where the
    fused loss is the default) were under-reported. With the formula, fused == reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from erw_fast.ops import projection_cosine_loss, projection_cosine_loss_ref

    torch.manual_seed(0)
    N, K, Z = 37, 24, 11
    h = torch.randn(N, K, requires_grad=need_grad)
    w = torch.randn(Z, K, requires_grad=need_grad)
    b = torch.randn(Z, requires_grad=need_grad)
    tgt = torch.randn(N, Z)
    counts = []
    for fn in (lambda: projection_cosine_loss(h, w, b, tgt, backend="torch"),
               lambda: projection_cosine_loss_ref(h, w, b, tgt)):
        with FlopCounterMode(display=False) as fc:
            loss = fn()
            if need_grad:
                loss.backward()
        counts.append(fc.get_total_flops())
    assert counts[1] == 2 * N * K * Z * (3 if need_grad else 1)
    assert counts[0] == counts[1]

"""Benchmarks of the fused ops (pytest-benchmark): ``pytest bench/ --benchmark-only``.

Per op (layernorm_modulate, gated_residual, projection_cosine_loss), per pass (fwd, fwdbwd), per
provider:
  eager    the PyTorch reference (``erw_fast.ops.*_ref``), eager mode
  compile  ``torch.compile(reference, fullgraph=True)`` (inductor), compile time excluded
  fused    the erw_fast op with ``backend="triton"`` -- CUDA only: on CPU Triton runs in the
           interpreter, which is not a speed, so the case is skipped with that reason.
Sizes: CUDA -> SiT-XL/2 (B*T = 256*256 tokens, D = 1152; N = 65536, K = 2048, Z = 768; bf16);
CPU -> small fp32 shapes so the whole file runs in well under two minutes on 2 cores.
Benchmark names: ``test_op[<op>-<pass>-<provider>]``; group ``<op>-<pass>``.  extra_info holds the
provider, sizes and, on CUDA, the peak memory above the inputs (MiB).  bench/conftest.py prints a
speed-ratio table (vs eager and vs compile) at the end of the session.

Note: the fused projection_cosine_loss computes its gradients inside the forward (that is the
design), so its ``fwd`` number includes the backward matmuls; compare ``fwdbwd`` for a fair view.
"""
import functools
import os

import torch

try:
    import pytest
except ImportError:  # bench/gpu_check.py uses the helpers below on a GPU machine without pytest
    pytest = None

import erw_fast.ops as ops

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if CUDA and not os.environ.get("ERW_BENCH_SMALL"):
    SIZES = dict(B=256, T=256, D=1152, N=65536, K=2048, Z=768, dtype=torch.bfloat16)
    ROUNDS, WARMUP = 30, 3
else:
    SIZES = dict(B=4, T=64, D=288, N=2048, K=256, Z=128, dtype=torch.float32)
    ROUNDS, WARMUP = 15, 2

OPS = ["layernorm_modulate", "gated_residual", "projection_cosine_loss"]
PASSES = ["fwd", "fwdbwd"]
PROVIDERS = ["eager", "compile", "fused"]

REFS = {
    "layernorm_modulate": ops.layernorm_modulate_ref,
    "gated_residual": ops.gated_residual_ref,
    "projection_cosine_loss": ops.projection_cosine_loss_ref,
}
FUSED = {
    "layernorm_modulate": ops.layernorm_modulate,
    "gated_residual": ops.gated_residual,
    "projection_cosine_loss": ops.projection_cosine_loss,
}


def make_inputs(op, requires_grad, sizes=SIZES, device=DEV, seed=0):
    """-> (args, differentiable args, grad_output or None)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = sizes["dtype"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    B, T, D = sizes["B"], sizes["T"], sizes["D"]
    if op == "layernorm_modulate":
        ada = rnd(B, 6 * D, scale=0.5)
        args = [rnd(B, T, D), ada[:, :D], ada[:, D:2 * D]]  # strided views like adaLN chunks
        grad_out = rnd(B, T, D)
    elif op == "gated_residual":
        ada = rnd(B, 6 * D, scale=0.5)
        args = [rnd(B, T, D), ada[:, 2 * D:3 * D], rnd(B, T, D)]
        grad_out = rnd(B, T, D)
    else:
        N, K, Z = sizes["N"], sizes["K"], sizes["Z"]
        h = rnd(N, K)
        w = rnd(Z, K, scale=K ** -0.5)
        b = rnd(Z, scale=0.1)
        target = rnd(N, Z)
        args = [h, w, b, target]
        grad_out = None
    if requires_grad:
        leaves = []
        for i, a in enumerate(args):
            if op == "projection_cosine_loss" and i == 3:
                continue
            a = a.detach().requires_grad_()
            args[i] = a
            leaves.append(a)
        return args, leaves, grad_out
    return args, [], grad_out


_COMPILED = {}


def get_fn(op, provider):
    if provider == "eager":
        return REFS[op]
    if provider == "compile":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(REFS[op], fullgraph=True)
        return _COMPILED[op]
    return functools.partial(FUSED[op], backend="triton")


def make_runner(op, pass_, provider, sizes=SIZES, device=DEV):
    fn = get_fn(op, provider)
    args, leaves, grad_out = make_inputs(op, pass_ == "fwdbwd", sizes, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                out = fn(*args)
            sync()
            return out
    else:
        def run():
            out = fn(*args)
            grads = torch.autograd.grad(out, leaves, grad_out)
            sync()
            return grads
    return run


def peak_mem_mib(run):
    """Peak CUDA memory of one call above what was allocated before it (MiB); None on CPU."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


if pytest is not None:  # the pytest-benchmark case; gpu_check.py does not need it
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("pass_", PASSES)
    @pytest.mark.parametrize("op", OPS)
    def test_op(benchmark, op, pass_, provider):
        if provider == "fused" and not CUDA:
            pytest.skip("fused (Triton) provider needs CUDA: on CPU Triton runs in the interpreter, which is "
                        "a correctness tool, not a speed")
        benchmark.group = f"{op}-{pass_}"
        # CPU: one intra-op thread -- on a shared 2-core box OpenMP barriers with a descheduled thread
        # turn sub-millisecond ops into multi-millisecond outliers.
        threads = torch.get_num_threads()
        if not CUDA:
            torch.set_num_threads(1)
        try:
            run = make_runner(op, pass_, provider)
            for _ in range(WARMUP):  # includes compile for provider == "compile"
                run()
            mem = peak_mem_mib(run)
            sizes = {k: (str(v) if k == "dtype" else v) for k, v in SIZES.items()}
            benchmark.extra_info.update(op=op, pass_=pass_, provider=provider, device=DEV, sizes=sizes,
                                        peak_mem_mib=mem, threads=torch.get_num_threads())
            benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        finally:
            torch.set_num_threads(threads)

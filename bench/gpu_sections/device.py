"""The device the sections run on (CUDA, or the CPU dry run through the Triton interpreter), the
kernels and the small helpers the sections share. Imported after ``common.init``."""
import os
import sys
import time

import torch

from . import common

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # bench/
ROOT = os.path.dirname(HERE)


def _import_ops():
    try:
        import erw_fast.kernels  # noqa: F401
    except ImportError:  # not pip-installed: import the package from this checkout
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
    import erw_fast.kernels as K
    import erw_fast.ops as ops

    return K, ops


K, ops = _import_ops()
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench_ops, step_bench
CUDA = torch.cuda.is_available() and not common.ARGS.dry_run
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn):
    """Median ms.  CUDA: triton.testing.do_bench; CPU (dry run): a few perf_counter rounds."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def rel(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def rnd(g, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale + shift).to(dtype)


def op_sizes():
    if CUDA:
        return dict(B=256, T=256, D=1152, N=65536, K=2048, Z=768, dtype=torch.bfloat16)
    return dict(B=2, T=16, D=72, N=128, K=64, Z=48, dtype=torch.float32)


def load_bench():
    import bench_ops  # no pytest needed: it only guards its pytest-benchmark case

    return bench_ops


def adaln_inputs(g, B, T, D, xdt, mdt):
    x = rnd(g, B, T, D, dtype=xdt)
    ada = rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
    odt = torch.promote_types(xdt, mdt)
    dy = rnd(g, B, T, D, dtype=odt)
    return x, ada[:, :D], ada[:, D:2 * D], dy, odt

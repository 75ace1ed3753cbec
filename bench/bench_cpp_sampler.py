"""Samples/s of the C++ sampler (``erw_sample`` over an AOTInductor package) vs the Python sampler.

    python -m pytest bench -k cpp_sampler --benchmark-only

Same tiny SiT as tests/test_export.py, same job for every provider: N samples of one class,
ODE Euler, S steps, guidance 1.8 on the interval [0, 0.7] (so part of the trajectory runs 2N rows,
part N rows). Providers (``extra_info["provider"]``, group ``sampler-...``):
  eager     erw_fast.sampling.sample with the eager PyTorch model (set_fused(False))
  compile   the same with torch.compile(model) (compile time excluded: warmed up first)
  cpp       the erw_sample process end to end (start-up and package load included); its
            extra_info also holds ``loop_samples_per_s``, the sampling loop alone (erw_sample's
            own report on stderr, without process start-up and package load)
extra_info holds ``samples_per_s`` for every provider. bench/conftest.py prints the ratio table (vs eager /
compile). Skips with the reason when cmake or a C++ compiler is missing. Sizes: ERW_BENCH_N
(default 16) samples, ERW_BENCH_STEPS (default 20) steps; ERW_BENCH_THREADS (default: torch's
thread count) CPU threads for both sides (erw_sample gets --threads). On a shared, busy machine use
ERW_BENCH_THREADS=1: OpenMP threads that wait on each other make every number noisy.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from erw_fast import sampling
from erw_fast.models.checkpoint import load_checkpoint
from erw_fast.models.sit import SiT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, encoder_depth=1,
           num_classes=10, z_dims=[16], projector_dim=32, use_rope=True, qk_norm=True)
SHAPE = (CFG["in_channels"], CFG["input_size"], CFG["input_size"])
N = int(os.environ.get("ERW_BENCH_N", "16"))
STEPS = int(os.environ.get("ERW_BENCH_STEPS", "20"))
CFG_SCALE, INTERVAL, LABEL = 1.8, (0.0, 0.7), 3
GROUP = f"sampler-ode-euler-N{N}-S{STEPS}-cfg{CFG_SCALE}"
ROUNDS = 5
THREADS = int(os.environ.get("ERW_BENCH_THREADS", "0")) or torch.get_num_threads()


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


MISSING = [w for w, ok in (("cmake", shutil.which("cmake")), ("a C++ compiler", _compiler())) if not ok]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not found on PATH")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpp_bench")
    torch.manual_seed(0)
    model = SiT(**CFG)
    with torch.no_grad():  # nonzero weights (adaLN-Zero would make the model output zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    ckpt = root / "ckpt.pt"
    torch.save({"model": sd, "ema": sd, "args": {"model_config": dict(CFG)}, "steps": 0}, ckpt)
    pkg = root / "model.pt2"
    r = subprocess.run([sys.executable, "-m", "erw_fast.export", "--ckpt", str(ckpt), "--out", str(pkg)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    build = root / "build"
    for cmd in (["cmake", "-S", REPO, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "-j2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    noise = torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(1))
    np.save(root / "noise.npy", noise.numpy())
    model = load_checkpoint(str(ckpt)).eval()
    model.set_fused(False)
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the same thread count for Python and C++
    yield dict(root=root, pkg=str(pkg), exe=str(build / "erw_sample"), noise=noise, model=model)
    torch.set_num_threads(before)


def _python(model, noise):
    return sampling.sample(model, noise, torch.full((N,), LABEL), sampler="ode-euler", steps=STEPS,
                           cfg_scale=CFG_SCALE, guidance_interval=INTERVAL)


def _label(benchmark, provider):
    benchmark.group = GROUP
    benchmark.extra_info.update(provider=provider, samples=N, steps=STEPS, threads=THREADS)


def _record(benchmark):
    benchmark.extra_info["samples_per_s"] = N / benchmark.stats.stats.median


def test_samples_per_s_python_sampler_eager(benchmark, setup):
    _label(benchmark, "eager")
    benchmark.pedantic(_python, args=(setup["model"], setup["noise"]), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark)


def test_samples_per_s_python_sampler_torch_compile(benchmark, setup):
    _label(benchmark, "compile")
    compiled = torch.compile(setup["model"])
    _python(compiled, setup["noise"])  # compile both batch sizes (N and 2N rows) before timing
    benchmark.pedantic(_python, args=(compiled, setup["noise"]), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark)


def _cpp(setup):
    r = subprocess.run([setup["exe"], setup["pkg"], "--noise", str(setup["root"] / "noise.npy"), "--class",
                        str(LABEL), "--sampler", "ode-euler", "--steps", str(STEPS), "--cfg-scale", str(CFG_SCALE),
                        "--guidance-interval", *map(str, INTERVAL), "--out", str(setup["root"] / "out.npy"),
                        "--threads", str(THREADS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return float(re.search(r"sampling ([0-9.]+)s", r.stderr).group(1))


def test_samples_per_s_cpp_erw_sample_process(benchmark, setup):
    _label(benchmark, "cpp")
    loops = []
    benchmark.pedantic(lambda: loops.append(_cpp(setup)), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark)
    loop = float(np.median(loops))
    benchmark.extra_info["loop_median_s"] = loop
    benchmark.extra_info["loop_samples_per_s"] = N / loop
    got = torch.from_numpy(np.load(setup["root"] / "out.npy"))
    assert (got - _python(setup["model"], setup["noise"])).abs().max().item() < 1e-4

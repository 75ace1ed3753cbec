"""Deployment: ``python -m erw_fast.export`` (AOTInductor package) and the C++ sampler ``erw_sample``.

One tiny SiT (RoPE + QK-norm, perturbed from its adaLN-Zero init and trained 3 steps so that every
layer and the class conditioning matter) is exported once and the sampler is built once with CMake
(session fixtures). The C++ sampler runs with noise the test provides and is compared with
``erw_fast.sampling.sample`` on the same model: ODE Euler (with and without guidance, and with a
guidance interval that excludes part of the trajectory) and ODE Heun within 1e-4. Because
erw_sample draws its random numbers exactly like ``erw_fast.sampling.sample_noise`` (one CPU
generator per sample index), the SDE matches too, and ``--seed`` alone reproduces ``sample_grid``.

The C++ tests skip, with the reason, only when cmake or a C++ compiler is missing (AOTInductor
needs the compiler for the export as well). The export's error paths run everywhere.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile

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
TOL = 1e-4


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


MISSING = [what for what, ok in (("cmake", shutil.which("cmake")), ("a C++ compiler (c++/g++/clang++)", _compiler()))
           if not ok]
needs_toolchain = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not found on PATH")


# --------------------------------------------------------------------------------------------
# Fixtures: one checkpoint, one export, one build per session
# --------------------------------------------------------------------------------------------
def make_tiny_checkpoint(path):
    """A tiny SiT: perturbed init (adaLN-Zero would give zero output), then 3 AdamW steps."""
    torch.manual_seed(0)
    model = SiT(**CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        model.y_embedder.embedding_table.weight.mul_(20.0)  # strong class conditioning
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        x0, eps = torch.randn(8, *SHAPE), torch.randn(8, *SHAPE)
        t = torch.rand(8)
        y = torch.randint(0, CFG["num_classes"], (8,))
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        loss = ((model(xt, t, y)[0] - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd, "ema": sd, "opt": opt.state_dict(), "args": {"model_config": dict(CFG)}, "steps": 3},
               path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt"))


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    model = load_checkpoint(tiny_ckpt, which="ema").eval()
    model.set_fused(False)
    return model


@pytest.fixture(scope="session")
def package(tiny_ckpt, tmp_path_factory):
    if MISSING:
        pytest.skip(f"{' and '.join(MISSING)} not found on PATH (AOTInductor compiles C++)")
    out = str(tmp_path_factory.mktemp("pkg") / "model.pt2")
    r = subprocess.run([sys.executable, "-m", "erw_fast.export", "--ckpt", tiny_ckpt, "--out", out],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def erw_sample(tmp_path_factory):
    if MISSING:
        pytest.skip(f"{' and '.join(MISSING)} not found on PATH")
    build = tmp_path_factory.mktemp("build")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["cmake", "-S", REPO, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    exe = build / "erw_sample"
    assert exe.is_file()
    return str(exe)


def run_cpp(exe, *args, check=True):
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def python_samples(model, noise, label, sampler, steps, cfg, interval, seed=0):
    gens = [sampling.index_generator(seed, i) for i in range(noise.shape[0])]
    labels = torch.full((noise.shape[0],), label, dtype=torch.long)
    return sampling.sample(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg,
                           guidance_interval=interval, generator=gens)


@pytest.fixture(scope="session")
def noise_file(tmp_path_factory):
    noise = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(123))
    path = tmp_path_factory.mktemp("noise") / "noise.npy"
    np.save(path, noise.numpy())
    return str(path), noise


# --------------------------------------------------------------------------------------------
# Equivalence with the Python sampler
# --------------------------------------------------------------------------------------------
CASES = [
    ("ode-euler", 12, 1.0, (0.0, 1.0)),
    ("ode-euler", 12, 2.5, (0.0, 1.0)),
    ("ode-euler", 12, 2.5, (0.0, 0.55)),   # guidance only on the last part of the trajectory
    ("ode-euler", 10, 0.0, (0.35, 0.75)),  # cfg 0 = the unconditional model, inside the interval
    ("ode-heun", 6, 1.8, (0.2, 0.9)),
    ("sde", 10, 1.8, (0.0, 0.7)),
]


@needs_toolchain
@pytest.mark.parametrize("sampler,steps,cfg,interval", CASES, ids=[f"{c[0]}-w{c[2]}-{c[3][0]}-{c[3][1]}" for c in CASES])
def test_cpp_matches_python_sampler(erw_sample, package, tiny_model, noise_file, tmp_path, sampler, steps, cfg,
                                    interval):
    path, noise = noise_file
    out = tmp_path / "out.npy"
    run_cpp(erw_sample, package, "--noise", path, "--class", 3, "--sampler", sampler, "--steps", steps,
            "--cfg-scale", cfg, "--guidance-interval", *interval, "--seed", 0, "--out", out, "--quiet")
    got = torch.from_numpy(np.load(out))
    assert got.dtype == torch.float32 and got.shape == noise.shape
    want = python_samples(tiny_model, noise, 3, sampler, steps, cfg, interval)
    err = (got - want).abs().max().item()
    assert err < TOL, f"max |C++ - Python| = {err}"
    if cfg != 1.0:  # the guidance must matter here, or the comparison proves nothing about it
        unguided = python_samples(tiny_model, noise, 3, sampler, steps, 1.0, interval)
        assert (want - unguided).abs().max().item() > 100 * TOL


@needs_toolchain
def test_guidance_interval_changes_result(erw_sample, package, noise_file, tmp_path):
    path, _ = noise_file
    outs = []
    for interval in ((0.0, 1.0), (0.0, 0.55)):
        out = tmp_path / f"out{interval[1]}.npy"
        run_cpp(erw_sample, package, "--noise", path, "--class", 1, "--sampler", "ode-euler", "--steps", 8,
                "--cfg-scale", 3.0, "--guidance-interval", *interval, "--out", out, "--quiet")
        outs.append(np.load(out))
    assert np.abs(outs[0] - outs[1]).max() > 100 * TOL


@needs_toolchain
def test_seed_reproduces_sample_grid_and_batching(erw_sample, package, tiny_model, tmp_path):
    """--seed K draws noise like sampling.sample_noise; results do not depend on --batch."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    args = ["--num", 5, "--class", 7, "--sampler", "sde", "--steps", 6, "--cfg-scale", 1.5, "--seed", 11, "--quiet"]
    run_cpp(erw_sample, package, *args, "--out", a)
    run_cpp(erw_sample, package, *args, "--batch", 2, "--out", b, "--grid", tmp_path / "grid.pgm")
    got_a, got_b = np.load(a), np.load(b)
    assert got_a.shape == (5, *SHAPE) and np.isfinite(got_a).all()
    assert np.abs(got_a - got_b).max() < TOL
    want = sampling.sample_grid(tiny_model, CFG["num_classes"], 5, SHAPE, sampler="sde", steps=6, cfg_scale=1.5,
                                seed=11, classes=[7])
    assert (torch.from_numpy(got_a) - want).abs().max().item() < TOL
    with open(tmp_path / "grid.pgm", "rb") as f:
        assert f.readline() == b"P5\n"
        w, h = map(int, f.readline().split())
        assert f.readline() == b"255\n"
        assert len(f.read()) == w * h


def test_metadata(package):
    assert sorted(os.listdir(os.path.dirname(package))) == ["model.pt2", "model.pt2.json"]  # renamed into place
    meta = json.load(open(package + ".json"))
    assert meta["erw.format"] == "erw_guided_velocity/1"
    assert meta["erw.input_size"] == "8" and meta["erw.in_channels"] == "4"
    assert meta["erw.num_classes"] == "10" and meta["erw.null_class"] == "10"
    assert meta["erw.batch"] == "dynamic" and meta["erw.weights"] == "ema" and meta["erw.steps"] == "3"


# --------------------------------------------------------------------------------------------
# Errors: the export
# --------------------------------------------------------------------------------------------
class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _export(*args):
    """``python -m erw_fast.export ARGS`` in-process (the error paths; saves interpreter start-ups)."""
    import contextlib
    import io

    from erw_fast import export

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = export.main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return _Result(rc, err.getvalue())


def test_export_rejects_non_sit_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    sd = {"linear.weight": torch.zeros(3, 3)}
    torch.save({"model": sd, "ema": sd, "args": {}, "steps": 1}, bad)
    r = _export("--ckpt", bad, "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "not a SiT checkpoint" in r.stderr, r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    r = _export("--ckpt", junk, "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "not a SiT checkpoint" in r.stderr, r.stderr
    r = _export("--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr
    (tmp_path / "emptyrun" / "checkpoints").mkdir(parents=True)
    r = _export("--ckpt", tmp_path / "emptyrun", "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "no checkpoint" in r.stderr, r.stderr
    only_model = tmp_path / "only_model.pt"
    torch.save({"model": sd, "args": {}, "steps": 1}, only_model)
    r = _export("--ckpt", only_model, "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "no 'ema' weights" in r.stderr, r.stderr
    assert not (tmp_path / "m.pt2").exists()


def test_run_folder_resolves_to_latest_checkpoint(tmp_path):
    from erw_fast.sampling.export import resolve_checkpoint

    (tmp_path / "checkpoints").mkdir()
    for step in ("0000010.pt", "0000200.pt", "0000030.pt"):
        (tmp_path / "checkpoints" / step).write_bytes(b"")
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "0000200.pt")
    assert resolve_checkpoint(str(tmp_path / "x.pt")) == str(tmp_path / "x.pt")


def test_export_without_aoti_packaging(monkeypatch, tmp_path):
    import torch._inductor as inductor

    from erw_fast.sampling import export

    monkeypatch.delattr(inductor, "aoti_compile_and_package")
    with pytest.raises(export.ExportError, match="lacks AOTInductor packaging"):
        export.export_package(SiT(**CFG), str(tmp_path / "m.pt2"))


@pytest.mark.parametrize("version, reuse_off", [("2.11.0+cu130", True), ("2.12.1", True), ("2.13.0+cpu", False),
                                               ("2.14.0.dev20261201", False), ("3.0.0", False)])
def test_buffer_reuse_off_only_where_inductor_crashes(monkeypatch, version, reuse_off):
    """torch 2.11's AOTInductor crashed on the guided package ("End index 7 out of bounds [0, 5]": buffer
    reuse planned inside the torch.cond subgraphs with the outer graph's peak estimate); the export turns
    reuse off below 2.13 and leaves inductor's default elsewhere. The whole export runs on 2.11 in
    the package fixture when the suite runs there."""
    from erw_fast.sampling import export

    monkeypatch.setattr(torch, "__version__", version)
    configs = export._inductor_configs({"erw.format": "x"})
    assert configs["aot_inductor.metadata"] == {"erw.format": "x"}
    assert ("allow_buffer_reuse" in configs) == reuse_off
    if reuse_off:
        assert configs["allow_buffer_reuse"] is False


def test_export_rejects_bad_flags(tiny_ckpt, tmp_path):
    r = _export("--ckpt", tiny_ckpt, "--out", tmp_path / "m.pt2", "--weights", "best")
    assert r.returncode == 2 and "--weights" in r.stderr


def test_failed_export_keeps_the_existing_package(tiny_ckpt, tmp_path, monkeypatch):
    """The package is built under a temporary name beside --out and renamed at the end: a failed compile
    (here simulated: a real one takes minutes) leaves the previous package and its .json as they were."""
    import torch._inductor as inductor

    out = tmp_path / "model.pt2"
    out.write_bytes(b"the previous package")
    (tmp_path / "model.pt2.json").write_text('{"erw.steps": "1"}')
    seen = []

    def failing_compile(ep, package_path=None, inductor_configs=None):
        seen.append(package_path)
        with open(package_path, "wb") as f:
            f.write(b"half a package")
        raise RuntimeError("simulated compiler failure\n(the compiler's output)")

    monkeypatch.setattr(inductor, "aoti_compile_and_package", failing_compile)
    r = _export("--ckpt", tiny_ckpt, "--out", out)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert errors == [f"error: the AOTInductor compile failed (RuntimeError: simulated compiler failure); {out} is "
                      "unchanged. A C++ compiler (CXX, default g++) must work; rerun with --debug for the full error"]
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0] != str(out) and seen[0].endswith(".pt2")
    assert out.read_bytes() == b"the previous package"
    assert json.loads((tmp_path / "model.pt2.json").read_text()) == {"erw.steps": "1"}
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "model.pt2.json"]  # no partial file left behind

    def working_compile(ep, package_path=None, inductor_configs=None):
        with open(package_path, "wb") as f:
            f.write(b"the new package")
        return package_path

    monkeypatch.setattr(inductor, "aoti_compile_and_package", working_compile)
    r = _export("--ckpt", tiny_ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"the new package"
    assert json.loads((tmp_path / "model.pt2.json").read_text())["erw.steps"] == "3"
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "model.pt2.json"]


# --------------------------------------------------------------------------------------------
# Errors: the C++ sampler
# --------------------------------------------------------------------------------------------
@needs_toolchain
def test_cpp_missing_or_incompatible_package(erw_sample, package, tiny_ckpt, tmp_path):
    out = tmp_path / "o.npy"
    r = run_cpp(erw_sample, tmp_path / "nope.pt2", "--out", out, check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    r = run_cpp(erw_sample, tiny_ckpt, "--out", out, check=False)  # a training checkpoint, not a package
    assert r.returncode == 1 and "incompatible package" in r.stderr and "erw_fast.export" in r.stderr
    text = tmp_path / "text.pt2"
    text.write_text("hello")
    r = run_cpp(erw_sample, text, "--out", out, check=False)
    assert r.returncode == 1 and "not an AOTInductor .pt2 archive" in r.stderr
    # a real AOTInductor package whose metadata is not erw_fast's
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("metadata.json"):
                data = data.replace(b"erw_guided_velocity/1", b"something_else/9")
            dst.writestr(item, data)
    r = run_cpp(erw_sample, foreign, "--out", out, check=False)
    assert r.returncode == 1 and "incompatible package" in r.stderr and "something_else/9" in r.stderr
    assert not out.exists()


@needs_toolchain
@pytest.mark.parametrize("args,message", [
    (["--sampler", "dpm"], "--sampler must be"),
    (["--steps", "abc"], "--steps expects an integer"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--cfg-scale"], "--cfg-scale needs a value"),
    (["--bogus", "1"], "unknown option --bogus"),
    (["--guidance-interval", "0.8", "0.2"], "LO <= HI"),
    (["--class", "11"], "out of range"),
    (["--noise", "NOISE", "--num", "3"], "has shape (5,4,8,8), expected (3,4,8,8)"),
])
def test_cpp_bad_flags(erw_sample, package, noise_file, tmp_path, args, message):
    args = [noise_file[0] if a == "NOISE" else a for a in args]
    out = tmp_path / "o.npy"
    r = run_cpp(erw_sample, package, "--out", out, *args, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert not out.exists()


@needs_toolchain
def test_cpp_requires_out_and_package(erw_sample, package):
    r = run_cpp(erw_sample, package, check=False)
    assert r.returncode == 2 and "--out is required" in r.stderr
    r = run_cpp(erw_sample, "--out", "x.npy", check=False)
    assert r.returncode == 2 and "package" in r.stderr

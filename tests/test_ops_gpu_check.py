"""bench/gpu_check.py on CPU (--dry-run: tiny sizes through the Triton interpreter): every section
runs, and a failed, skipped or cut section makes the exit status non-zero and is named in the
summary (stdout, results.md, results.json).  The script is always run with a ``pytest`` that does
not import (the GPU machine has none), and the missing-numpy / missing-triton paths are simulated
with modules that raise ImportError put first on PYTHONPATH."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
SECTIONS = ["correctness", "timings", "bandwidth", "memory", "compile_fused", "sweep", "fp8", "steps"]
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path; on CUDA run the real check")


def _blocker(tmp_path, *modules):
    d = tmp_path / "blocked"
    d.mkdir(exist_ok=True)
    for m in modules:
        (d / f"{m}.py").write_text(f"raise ImportError('simulated: no {m} on this machine')\n")
    return str(d)


def run(tmp_path, *args, block=("pytest",), timeout=240, interpret=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([_blocker(tmp_path, *block)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return r, r.stdout + r.stderr


def results(out):
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_help_lists_sections(tmp_path):
    r, text = run(tmp_path, "--help")
    assert r.returncode == 0, text
    for name in SECTIONS + ["--only", "--skip", "--budget-s"]:
        assert name in r.stdout
    assert "--fail-section" not in r.stdout  # a testing hook, hidden


@cpu_only
def test_dry_run_all_sections(tmp_path):
    """Every section passes. Where torchao is not installed (the GPU machine until its wheel is
    carried) the fp8 section is the one exception: recorded as not run, with the instructions, and the
    run is not a pass."""
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run")
    res, md = results(out)
    status = 0 if HAVE_TORCHAO else 1
    assert r.returncode == status, text[-4000:]
    assert {n: s["status"] for n, s in res["sections"].items()} == \
        dict({n: "ok" for n in SECTIONS}, **({} if HAVE_TORCHAO else {"fp8": "incomplete"}))
    if not HAVE_TORCHAO:
        assert "pip install --no-deps" in res["fp8"]["not_run"] and "## Result: PASS" not in md
    assert res["correctness"] and all(c["ok"] for c in res["correctness"])
    assert not res["errors"], res["errors"]
    assert {t["op"] for t in res["timings"]} == {"layernorm_modulate", "gated_residual", "projection_cosine_loss"}
    assert "copy_GBps" in res["bandwidth"] and res["sweep"]
    assert res["compile_fused"]["ok"] and res["compile_fused"]["kernel_launches"] > 0
    assert res["memory"]["loss_rel_err"] < 2e-2
    # the step benchmark got the real remaining budget (minus its margin) and wrote its results
    assert 0 < res["steps"]["budget_s"] < 270 - res["meta"]["startup_s"]
    assert (out / "step_results.json").exists()
    assert res["meta"]["total_s"] < 270 and res["meta"]["exit_status"] == status
    assert md.startswith("# erw_fast fused-op GPU check")
    assert ("## Result: PASS" in md and "gpu_check: PASS" in r.stdout) == HAVE_TORCHAO


@cpu_only
def test_failed_section_fails_the_run_and_only_runs_the_subset(tmp_path):
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run", "--only", "memory,bandwidth", "--fail-section", "memory")
    assert r.returncode == 1, text[-4000:]
    res, md = results(out)
    st = {n: s["status"] for n, s in res["sections"].items()}
    assert st == dict({n: "not selected" for n in SECTIONS}, memory="failed", bandwidth="ok")
    assert "injected failure" in res["sections"]["memory"]["reason"]
    assert not res["correctness"] and not res["timings"] and not res["sweep"]  # nothing else ran
    assert "copy_GBps" in res["bandwidth"]
    assert "FAIL: memory failed" in md and "injected failure" in md
    assert "FAIL: memory failed" in r.stdout and "injected failure" in r.stdout


@cpu_only
def test_section_without_budget_to_start_is_skipped_and_fails_the_run(tmp_path):
    # --skip for a subset; the hidden --section-min-s makes steps need more time than is left
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run", "--skip", "correctness,timings,bandwidth,compile_fused,sweep,fp8",
                  "--section-min-s", "steps=1e6")
    assert r.returncode == 1, text[-4000:]
    res, md = results(out)
    assert res["sections"]["memory"]["status"] == "ok"
    assert res["sections"]["steps"]["status"] == "skipped"
    assert "time budget" in res["sections"]["steps"]["reason"]
    assert res["sections"]["timings"] == {"status": "not selected", "reason": "--skip"}
    assert "steps skipped" in md and "steps skipped" in r.stdout
    assert not (out / "step_results.json").exists()


def test_tiny_budget_is_a_hard_bound(tmp_path):
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run", "--budget-s", "0.5", timeout=60)
    assert r.returncode == 1, text[-4000:]
    res, md = results(out)
    for n in SECTIONS:
        assert res["sections"][n]["status"] == "skipped", res["sections"][n]
        assert "budget" in res["sections"][n]["reason"]
    assert res["meta"]["total_s"] < 5
    assert "correctness skipped" in r.stdout and "**SKIPPED**" in md


@cpu_only
def test_section_running_at_the_bound_is_stopped_and_failed(tmp_path):
    # the hidden --stall-section makes memory hang: the watchdog must end the run at the bound
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run", "--only", "memory,sweep", "--stall-section", "memory",
                  "--section-min-s", "memory=0", "--budget-s", "8", timeout=60)
    assert r.returncode == 1, text[-4000:]
    res, md = results(out)
    assert res["sections"]["memory"]["status"] == "failed"
    assert "hard wall-clock bound" in res["sections"]["memory"]["reason"]
    assert res["sections"]["sweep"]["status"] == "skipped"  # after memory: never started
    assert res["meta"]["total_s"] <= 8
    assert "memory failed" in r.stdout and "memory failed" in md


@pytest.mark.parametrize("missing", ["numpy", "triton"])
def test_missing_dependency_is_one_line_exit_2(tmp_path, missing):
    r, text = run(tmp_path, block=("pytest", missing), timeout=60)  # no OUT given: the check comes first
    assert r.returncode == 2, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert text.startswith(f"gpu_check: missing dependency: {missing}")


@cpu_only
def test_without_cuda_says_so(tmp_path):
    r, text = run(tmp_path, str(tmp_path / "out"), interpret=False, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stdout, text


@cpu_only
def test_fp8_section_says_how_to_carry_torchao_when_it_is_missing(tmp_path):
    out = tmp_path / "out"
    r, text = run(tmp_path, str(out), "--dry-run", "--only", "fp8", block=("pytest", "torchao"), timeout=120)
    assert r.returncode == 1, text[-4000:]  # not measured: the run is incomplete
    res, md = results(out)
    assert res["sections"]["fp8"]["status"] == "incomplete"
    for needle in ("pip install --no-deps", "docs/BENCHMARKS.md"):
        assert needle in res["fp8"]["not_run"] and needle in md

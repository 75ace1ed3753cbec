"""bench/gpu_check.py runs its CPU-safe parts (--dry-run: tiny sizes through the Triton interpreter)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="dry run is the CPU path; on CUDA run the real check")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["correctness"] and all(c["ok"] for c in res["correctness"])
    assert not res["errors"], res["errors"]
    assert {t["op"] for t in res["timings"]} == {"layernorm_modulate", "gated_residual", "projection_cosine_loss"}
    assert "copy_GBps" in res["bandwidth"]
    assert (tmp_path / "results.md").read_text().startswith("# erw_fast fused-op GPU check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_check_without_cuda_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no CUDA device" in r.stdout

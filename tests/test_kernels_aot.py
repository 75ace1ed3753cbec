"""The CUDA path, proved without a GPU: every Triton kernel in ``erw_fast/kernels/`` compiles ahead of time for
sm_80 and sm_90 with the launch parameters its launcher picks (``erw_fast.kernels.aot``).

The compiles run once per module, in a subprocess without ``TRITON_INTERPRET`` (conftest sets it
for this process, and Triton decides between interpreted and compiled kernels when a kernel module
is imported).  Registers and spills come from the wheel's ``ptxas -v``, shared memory from the
compiled kernels' metadata; see the "Ahead-of-time compile (no GPU)" section of docs/BENCHMARKS.md.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from erw_fast.kernels import aot

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "erw_fast" / "kernels"
DOC = ROOT / "docs" / "BENCHMARKS.md"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _jit_kernels():
    """(module, kernel) for every ``@triton.jit`` function in erw_fast/kernels/*.py."""
    found = set()
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for name in re.findall(r"^@triton\.jit[^\n]*\ndef (\w+)", path.read_text(), flags=re.M):
            found.add((f"erw_fast.kernels.{path.stem}", name))
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "erw_fast.kernels.aot", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"aot run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    data = json.loads(out.read_text())
    data["rc"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_every_kernel_compiles_for_every_target_dtype_and_size(compiled):
    assert not compiled["errors"], "\n".join(f"{e['name']} {e['size']} {e['dtype']} sm_{e['arch']}: {e['error']}"
                                              for e in compiled["errors"])
    results = compiled["results"]
    kernels = _jit_kernels()
    assert len(kernels) == 5, kernels  # 2 layernorm_modulate, 2 gated_residual, 1 cosine rows
    assert {(r["module"], r["kernel"]) for r in results} == kernels, "a kernel in erw_fast/kernels/ is not compiled by aot"
    cells = {(r["kernel"], r["size"], r["dtype"], r["arch"]) for r in results}
    want = {(k, s, d, a) for _, k in kernels for s in aot.SIZES for d in aot.cases_for(s) for a in aot.ARCHS}
    assert {d for _, _, d, _ in want} == {"fp32", "bf16", "mixed", "amp"} and {"odd", "XL"} <= set(aot.SIZES)
    assert cells == want and len(results) == len(want)
    assert all(r["cubin_bytes"] > 0 and r["signature"] for r in results)
    assert compiled["failures"] == [] and compiled["rc"] == 0, compiled["stderr"][-3000:]


def test_compiled_with_the_launchers_cuda_choices(compiled):
    """Tile sizes / warps are the launchers' own CUDA defaults (XL, 132 SMs)."""
    xl = {(r["name"], r["dtype"], r["arch"]): r for r in compiled["results"] if r["size"] == "XL"}
    lnb = xl[("layernorm_modulate_bwd", "bf16", 90)]
    assert lnb["constexprs"] == {"BLOCK_T": 2, "BLOCK_D": 2048} and lnb["warps"] == 16
    assert lnb["grid"] == [3, 256]  # ceil(4 * 132 / 256) = 3 T-splits per batch row
    assert xl[("layernorm_modulate_fwd", "bf16", 90)]["warps"] == 8
    gr = xl[("gated_residual_bwd", "fp32", 80)]
    assert gr["constexprs"] == {"BLOCK_T": 16, "BLOCK_D": 256} and gr["grid"][1] == 5  # 1152 = 5 x 256 (padded)
    cos = xl[("cosine_loss_grad_rows", "bf16", 90)]
    assert cos["constexprs"] == {"BLOCK_R": 4, "BLOCK_Z": 1024} and cos["grid"] == [2048]  # 8192-row chunk
    # the specialization a real launch gets: 16-byte aligned pointers, D = 1152 divisible by 16
    assert lnb["signature"]["X"] == "*bf16" and lnb["signature"]["SCALE"] == "*bf16"
    assert xl[("layernorm_modulate_bwd", "mixed", 80)]["signature"]["SCALE"] == "*fp32"


def test_no_spills_and_small_shared_memory_at_xl_defaults(compiled):
    for r in compiled["results"]:
        where = (r["name"], r["size"], r["dtype"], r["arch"])
        assert r["smem"] <= aot.SMEM_OPTIN[80], where  # hard limit: sm_80 per-block opt-in
        assert r["ctas_per_sm"] >= 1, where
        if r["size"] == "XL":
            assert (r["spill_stores"], r["spill_loads"], r["stack"], r["cubin_local"]) == (0, 0, 0, 0), where
            assert r["smem"] <= aot.SMEM_DEFAULT, where


def test_ptxas_log_matches_the_cubin(compiled):
    for r in compiled["results"]:
        assert r["regs"] == r["cubin_reg"] and 16 <= r["regs"] <= 255, r["ptxas_log"]
        assert r["stack"] == r["cubin_stack"]
        assert f"'{r['kernel']}' for 'sm_{r['arch']}" in r["ptxas_log"]


def test_occupancy_rule():
    # the number: 84 registers at 16 warps -> 1 CTA (16 of 64 warps) per SM
    occ = aot.occupancy(80, 84, 16, 8192)
    assert (occ["ctas_per_sm"], occ["warps_per_sm"], occ["limiter"]) == (1, 16, "regs")
    assert aot.occupancy(90, 64, 16, 128)["ctas_per_sm"] == 2  # 64 regs: 2048 per warp, 32 warps fit
    assert aot.occupancy(90, 32, 8, 64)["ctas_per_sm"] == 8  # the 64-warp cap
    assert aot.occupancy(80, 32, 4, 100 * 1024)["limiter"] == "smem"


def test_doc_section_exists():
    text = DOC.read_text(encoding="utf-8")
    assert aot.SECTION in text, f"run: python -m erw_fast.kernels.aot --update-doc {DOC.relative_to(ROOT)}"
    section = text[text.index(aot.SECTION):]
    nxt = re.search(r"^## ", section[len(aot.SECTION):], flags=re.M)
    section = section[: len(aot.SECTION) + nxt.start()] if nxt else section
    for name in ("layernorm_modulate_fwd", "layernorm_modulate_bwd", "gated_residual_fwd", "gated_residual_bwd",
                 "cosine_loss_grad_rows"):
        for arch in aot.ARCHS:
            assert re.search(rf"^\| {name} \| sm_{arch} \| bf16 \| ", section, flags=re.M), (name, arch)

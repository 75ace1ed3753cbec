#!/usr/bin/env python
"""One-command GPU check of the fused ops and the training step, within one wall-clock budget.

    python3 -m pip install --no-deps --no-build-isolation -e .     # once, on the GPU machine
    python bench/gpu_check.py OUTDIR             # CUDA: every section, at most --budget-s 270 s in all
    python bench/gpu_check.py OUTDIR --dry-run   # no GPU needed: tiny sizes, Triton interpreter on CPU
    python bench/gpu_check.py OUTDIR --only correctness,compile_fused     # a subset (or --skip steps)

Needs torch, triton and numpy (no pytest).  Sections, in the order they run (``--help`` lists them):
  correctness    every kernel (layernorm_modulate, gated_residual, projection_cosine_loss) against a
                 float64 reference: fp32, bf16 and mixed (fp32 x / bf16 modulation) inputs, forward and
                 every gradient, NaN-poisoned buffers, masked (non power of two) shapes; bitwise
                 determinism of the backward reductions.
  timings        SiT-XL/2 sizes (B*T = 256*256, D = 1152; N = 65536, K = 2048, Z = 768; bf16): eager
                 reference / torch.compile(reference) / fused, fwd and fwd+bwd, do_bench median.
  bandwidth      layernorm_modulate fwd+bwd achieved bandwidth vs a measured device-to-device copy
                 (also fp32 x with bf16 shift/scale, the layout under bf16 autocast).
  memory         projection_cosine_loss peak memory (fwd+bwd, above the inputs) vs eager at N = 65536.
  compile_fused  torch.compile(fullgraph=True) of an adaLN block + loss written with the custom ops,
                 under bf16 autocast, matches eager and the Triton kernels ran.
  sweep          a small tile-size sweep of the layernorm_modulate kernels.
  fp8            --precision fp8 (torchao float8 linears) vs bf16: SiT-XL/2 full ERW step, compiled, batch
                 32, 20 steps from the same weights: img/s, MFU against the bf16 peak, every step's loss
                 (they must agree within 5% on average). Needs a card of compute capability >= 8.9 and
                 torchao (not run otherwise, saying how to carry the wheel: docs/BENCHMARKS.md).
  steps          training-step benchmarks, naive vs ours (bench/step_bench.py) -> OUTDIR/step_results.*
The dry run runs every section at tiny sizes on CPU (memory: code path only; compile_fused with the
aot_eager backend; steps: the small digits config, eager, batch 8; fp8: the small config, emulated
float8, eager, 3 steps).

Budget: one hard wall-clock bound, ``--budget-s`` (default 270) counted from process start (before
torch is imported).  A section starts only when at least its minimum time is left, else it is recorded
as skipped; a started section gets its share of what is left (by its weight, the last one all of it)
and stops at the end of its share, recording the parts it did not run; the step benchmark is given
the remaining seconds minus a margin.  A watchdog ends the process at the bound whatever is running,
after writing the results with that section marked failed.

Writes OUTDIR/results.json (everything) and OUTDIR/results.md (tables) after every section, prints
the tables and a per-section summary last. One module per section: bench/gpu_sections/<name>.py
(``run(ctx)``), listed with its budget weight in bench/gpu_sections/common.py:SECTIONS.  Exit status: 0 when every selected section ran to the
end and passed; 1 when any failed, was skipped (budget) or stopped early; 2 when a dependency is
missing or no CUDA device is present without --dry-run.
"""
import time

T_START = time.time()  # the budget counts from here: before torch, triton and CUDA start-up

import importlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # gpu_sections, bench_ops, step_bench
if "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from gpu_sections import common  # noqa: E402
from gpu_sections.common import LOCK, RESULTS, SECTIONS, STATE, finish, timing_table  # noqa: E402

ARGS = common.init(T_START, __doc__)

import torch  # noqa: E402

from gpu_sections.device import CUDA, op_sizes  # noqa: E402
from gpu_sections.runner import run_section  # noqa: E402

# one module per section, gpu_sections/<name>.py with run(ctx); the table is gpu_sections/common.py:SECTIONS
FUNCS = {name: importlib.import_module(f"gpu_sections.{name}").run for name in SECTIONS}


def _no_cuda():
    msg = ("gpu_check: no CUDA device here. Run it on a GPU machine, or use --dry-run to exercise the "
           "script on CPU through the Triton interpreter (tiny sizes).")
    with LOCK:
        STATE["done"] = True
    common.WATCHDOG.cancel()
    print(msg)
    os.makedirs(ARGS.outdir, exist_ok=True)
    with open(os.path.join(ARGS.outdir, "results.md"), "w") as f:
        f.write(msg + "\n")
    return 2


def _print_tables():
    print("\n" + timing_table())
    for k, v in RESULTS["bandwidth"].items():
        if isinstance(v, dict):
            print(f"layernorm_modulate fwd+bwd {k}: {v['GBps']:.0f} GB/s = {100 * v['frac_of_copy']:.1f}% of copy")
    if "ratio_above_inputs" in RESULTS["memory"]:
        print(f"projection_cosine_loss peak memory fused/eager: above inputs x{RESULTS['memory']['ratio_above_inputs']:.2f}, "
              f"total x{RESULTS['memory']['ratio_total']:.2f}")
    corr = RESULTS["correctness"]
    if corr:
        print(f"correctness: {sum(r['ok'] for r in corr)}/{len(corr)} passed; errors: {len(RESULTS['errors'])}")


def main():
    if not torch.cuda.is_available() and not ARGS.dry_run:
        return _no_cuda()
    import triton

    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are against fp64: no TF32
        torch.backends.cudnn.allow_tf32 = False
    RESULTS["meta"].update(
        device=torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        mode="cuda" if CUDA else "dry-run", sizes={k: str(v) for k, v in op_sizes().items()},
        budget_s=ARGS.budget_s, selected=ARGS.selected, startup_s=round(time.time() - T_START, 1))
    print(f"gpu_check: {RESULTS['meta']['device']}, budget {ARGS.budget_s:g} s, start-up took "
          f"{RESULTS['meta']['startup_s']} s; sections: {', '.join(ARGS.selected)}", flush=True)
    for name in ARGS.selected:
        run_section(name, FUNCS[name])
    with LOCK:
        if STATE["done"]:  # the watchdog is writing the results and ends the process
            time.sleep(60)
        STATE["done"] = True
        common.WATCHDOG.cancel()
        _print_tables()
        return finish()


if __name__ == "__main__":
    sys.exit(main())

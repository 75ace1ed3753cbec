"""Section ``steps``: the training-step benchmarks, naive vs ours (bench/step_bench.py)."""
import torch

from . import common
from .common import RESULTS, STEPS_MARGIN_S
from .device import CUDA, DEV

def run(ctx):
    """bench/step_bench.py with the remaining budget (minus a margin: its budget is soft)."""
    from step_bench import markdown_table, run_step_benchmarks

    budget = max(0.0, ctx.left() - STEPS_MARGIN_S[CUDA])
    if CUDA:
        sizes, kw = tuple(s for s in common.ARGS.step_sizes.split(",") if s), {}
    else:  # the small digits config, eager, a small batch: the code path in a few seconds
        sizes, kw = ("small",), dict(batch=8, rounds=3, compile=False, compile_margin_s=3.0)
    RESULTS["steps"] = {"budget_s": round(budget, 1), "sizes": list(sizes)}
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # as step_bench.py on CPU: a shared box's OpenMP barriers make outliers
    try:
        res = run_step_benchmarks(common.ARGS.outdir, DEV, sizes, budget_s=budget, **kw)
    finally:
        torch.set_num_threads(threads)
    rows, errors = res["rows"], res["meta"].get("errors", [])
    RESULTS["steps"].update(table=markdown_table(rows), errors=[{k: v for k, v in e.items() if k != "traceback"}
                                                                 for e in errors],
                            rows=[{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
    print(RESULTS["steps"]["table"], flush=True)
    if errors:
        ctx.fail(f"{len(errors)} step-benchmark error(s), first: {errors[0].get('where')}: "
                 f"{str(errors[0].get('error'))[:200]}")
    if not rows:
        ctx.fail("no step-benchmark rows")
    for r in rows:
        if r.get("skipped"):
            ctx.not_run(f"{r['size']} {r['kind']} ({r['skipped'][:120]})")

"""pytest plugin (registered by ``bench/bench_train_step.py`` through ``pytest_plugins``): at the end
of the session, print the training-step table -- per size and step kind, naive img/s, ours img/s and
ours/naive, measured interleaved in the same run -- and, when ``ERW_STEP_BENCH_OUT`` names a folder,
write it there as ``step_results.json`` and ``step_results.md``."""
import os

import pytest


def _rows():
    try:
        import step_bench as sb
    except ImportError:  # pragma: no cover
        return None, []
    rows = [r for r in sb.REPORT.values() if "ratio" in r]
    order = {k: i for i, k in enumerate(sb.KINDS)}
    rows.sort(key=lambda r: (r["size"], order.get(r["kind"], 9)))
    return sb, rows


def format_step_table(rows):
    lines = [f"{'size':9s} {'step':8s} {'batch':>5s} {'naive img/s':>12s} {'ours img/s':>11s} {'ours/naive':>11s} "
             f"{'pairs med':>10s} {'bench med':>10s} {'ours MFU':>9s}"]
    for r in rows:
        bench = f"{r['bench_ratio']:9.2f}x" if r.get("bench_ratio") else "       n/a"
        mfu = f"{100 * r['ours_mfu']:8.1f}%" if r.get("ours_mfu") is not None else "      n/a"
        lines.append(f"{r['size']:9s} {r['kind']:8s} {r['batch']:5d} {r['naive_img_s']:12.1f} {r['ours_img_s']:11.1f} "
                     f"{r['ratio']:10.2f}x {r['pair_ratio_median']:9.2f}x {bench} {mfu}")
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sb, rows = _rows()
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "training steps: naive vs ours (interleaved medians, same run; >1x = ours faster)")
    tr.write_line(format_step_table(rows))
    tr.write_line("ours/naive: median naive step time / median ours step time, both timed interleaved; "
                  "pairs med: median of per-pair ratios; bench med: ratio of the two pytest-benchmark medians")
    for r in rows:
        if r.get("naive_phases"):
            for side in ("naive", "ours"):
                p = r[f"{side}_phases"]
                tr.write_line(f"  {r['size']} {r['kind']} {side:5s} phases (ms): "
                              + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in p.items()))
    for c in sb.headline_checks(rows):
        tr.write_line("  " + c)
    out = os.environ.get("ERW_STEP_BENCH_OUT")
    if out:
        import torch

        meta = sb.environment("cuda" if torch.cuda.is_available() else "cpu")
        meta["source"] = "pytest bench/bench_train_step.py"
        meta["threads"] = rows[0].get("threads", meta.get("threads"))  # what the step benchmarks ran with
        sb.write_results(out, rows, meta)
        tr.write_line(f"written: {os.path.join(out, 'step_results.json')} and step_results.md")

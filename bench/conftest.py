"""bench/ set-up (``bench_*.py`` files are collected through ``python_files`` in pytest.ini): print a speed-ratio table at the end.

Any benchmark that puts ``provider`` into ``benchmark.extra_info`` (and sets ``benchmark.group``)
appears in the table: per group, each provider's median time, its speed relative to the ``eager``
and ``compile`` providers of the same group (> 1 = faster), and ``peak_mem_mib`` when recorded.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") is None:  # same rule as tests/conftest.py
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:  # pragma: no cover
        pass


def _rows(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return []
    rows = []
    for b in getattr(bs, "benchmarks", []):
        info = getattr(b, "extra_info", {}) or {}
        if "provider" not in info:
            continue
        try:
            median = b.stats.median
        except Exception:
            continue
        rows.append((b.group or "", info["provider"], median, info.get("peak_mem_mib")))
    return rows


def format_ratio_table(rows):
    groups = {}
    for group, provider, median, mem in rows:
        groups.setdefault(group, {})[provider] = (median, mem)
    lines = [f"{'group':40s} {'provider':10s} {'median ms':>11s} {'vs eager':>9s} {'vs compile':>11s} {'peak MiB':>10s}"]
    for group in sorted(groups):
        g = groups[group]
        eager = g.get("eager", (None,))[0]
        comp = g.get("compile", (None,))[0]
        for provider, (median, mem) in sorted(g.items()):
            ve = f"{eager / median:8.2f}x" if eager else "      n/a"
            vc = f"{comp / median:10.2f}x" if comp else "        n/a"
            ms = f"{mem:10.1f}" if mem is not None else "       n/a"
            lines.append(f"{group:40s} {provider:10s} {median * 1e3:11.3f} {ve:>9s} {vc:>11s} {ms}")
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows(config)
    if not rows:
        return
    terminalreporter.write_sep("=", "speed ratios (median; >1x = faster than the reference provider)")
    terminalreporter.write_line(format_ratio_table(rows))

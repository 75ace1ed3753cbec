"""What every section shares, without torch (the watchdog may fire before torch is imported): the
section table, the command line, the results and their report, and the hard wall-clock bound.
``init(t_start)`` parses the command line and starts the watchdog; ``ARGS`` is set from then on."""
import argparse
import json
import os
import sys
import threading
import time
import traceback

ARGS = None
T_START = None
WATCHDOG = None

# name -> (weight: expected CUDA seconds, the share of the budget; minimum seconds to start on CUDA,
# in the dry run; one-line description).  Dict order is run order.
SECTIONS = {
    "correctness": (60, 10, 3, "every kernel vs float64: dtypes, gradients, NaN-poison, masks, determinism"),
    "timings": (50, 15, 1, "eager / torch.compile / fused median ms, fwd and fwd+bwd, SiT-XL/2 sizes"),
    "bandwidth": (8, 3, 0.5, "layernorm_modulate fwd+bwd GB/s vs device-to-device copy"),
    "memory": (5, 2, 0.5, "projection_cosine_loss peak memory fused vs eager (CPU: code path only)"),
    "compile_fused": (30, 30, 2, "torch.compile(fullgraph) of the custom ops under bf16 autocast vs eager"),
    "sweep": (20, 5, 0.5, "tile-size sweep of the layernorm_modulate kernels"),
    "fp8": (50, 45, 3, "SiT-XL/2 full ERW step compiled, bf16 vs --precision fp8: img/s, MFU, 20 steps' losses"),
    "steps": (120, 80, 6, "training-step benchmark naive vs ours (bench/step_bench.py)"),
}
END_MARGIN_S = 3.0    # kept free at the end of the budget for the summary and the last write
STEPS_MARGIN_S = {True: 10.0, False: 2.0}  # [cuda]: taken off the step benchmark's (soft) budget
HARD_MARGIN_S = 1.0   # the watchdog fires this long before the bound, to write the results


# ------------------------------------------------------------------------------------------------
# command line and dependencies (no torch yet)

def _names(text, p, flag):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        p.error(f"{flag}: unknown section(s) {', '.join(bad)}; sections: {', '.join(SECTIONS)}")
    return names


def _parse(argv=None, doc=""):
    epilog = "sections, in run order (weight = share of the budget, min = seconds needed to start on CUDA):\n" + \
        "\n".join(f"  {n:14s} weight {w:3d}, min {m:3d} s: {d}" for n, (w, m, _, d) in SECTIONS.items()) + \
        "\nexit status: 0 every selected section ok; 1 one failed, was skipped (budget) or stopped early; " \
        "2 numpy/triton missing, or no CUDA device without --dry-run"
    p = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="results go to OUTDIR/results.{json,md} (and step_results.*)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: tiny sizes through the Triton interpreter (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="hard wall-clock bound for the whole script, from process start (default 270)")
    p.add_argument("--only", default=None, metavar="S1,S2", help="run only these sections")
    p.add_argument("--skip", default="", metavar="S1,S2", help="do not run these sections")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile provider in timings, and skip compile_fused")
    p.add_argument("--no-sweep", action="store_true", help="same as --skip sweep")
    p.add_argument("--step-sizes", default="SiT-XL/2,SiT-B/2", help="sizes of the steps section on CUDA")
    # testing hooks (tests/test_ops_gpu_check.py): make a section fail, hang, or need more time than there is
    p.add_argument("--fail-section", default="", help=argparse.SUPPRESS)
    p.add_argument("--stall-section", default="", help=argparse.SUPPRESS)
    p.add_argument("--section-min-s", action="append", default=[], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    only = _names(a.only, p, "--only") if a.only is not None else list(SECTIONS)
    skip = set(_names(a.skip, p, "--skip"))
    a.deselected = {n: "--skip" for n in skip}
    if a.only is not None:
        a.deselected.update({n: "not in --only" for n in SECTIONS if n not in only})
    if a.no_compile:
        a.deselected.setdefault("compile_fused", "--no-compile")
    if a.no_sweep:
        a.deselected.setdefault("sweep", "--no-sweep")
    a.selected = [n for n in SECTIONS if n not in a.deselected]
    if not a.selected:
        p.error("no section left to run")
    a.fail_section = set(_names(a.fail_section, p, "--fail-section"))
    a.stall_section = set(_names(a.stall_section, p, "--stall-section"))
    a.min_s = {}
    for item in a.section_min_s:
        name, _, sec = item.partition("=")
        try:
            a.min_s[_names(name, p, "--section-min-s")[0]] = float(sec)
        except (ValueError, IndexError):
            p.error(f"--section-min-s {item!r}: use NAME=SECONDS")
    return a


def _check_deps():
    """numpy and triton must import; else one line on stderr and exit 2 (before argparse needs OUT)."""
    missing = []
    for mod, why in (("numpy", "erw_fast's model and Triton's interpreter use it"),
                     ("triton", "the fused kernels are Triton kernels")):
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken install
            missing.append(f"{mod} ({why}; import failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
    if missing:
        print(f"gpu_check: missing dependency: {'; '.join(missing)}. Install it (python3 -m pip install "
              f"{' '.join(m.split(' ')[0] for m in missing)}) and run again.", file=sys.stderr, flush=True)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# results, report and the hard bound (no torch here: the watchdog may run before torch is imported)

RESULTS = {"meta": {}, "sections": {}, "correctness": [], "timings": [], "bandwidth": {}, "memory": {},
           "sweep": [], "fp8": {}, "steps": {}, "errors": []}
LOCK = threading.RLock()
STATE = {"running": None, "done": False}


def save():
    got = LOCK.acquire(timeout=5)  # (a watchdog that could not take the lock still writes)
    try:
        os.makedirs(ARGS.outdir, exist_ok=True)
        for _ in range(3):  # the watchdog may save while the main thread appends: retry a changed dict
            try:
                text = json.dumps(RESULTS, indent=1, default=str)
                break
            except RuntimeError:
                time.sleep(0.01)
        else:
            text = json.dumps({"meta": RESULTS["meta"], "sections": RESULTS["sections"]}, default=str)
        for name, body in (("results.json", text), ("results.md", markdown())):
            tmp = os.path.join(ARGS.outdir, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, os.path.join(ARGS.outdir, name))
    finally:
        if got:
            LOCK.release()


def not_ok():
    return [n for n in ARGS.selected if RESULTS["sections"][n]["status"] != "ok"]


def section_lines():
    lines = []
    for n in SECTIONS:
        s = RESULTS["sections"][n]
        st = s["status"] if s["status"] in ("ok", "not selected") else s["status"].upper()
        secs = f"{s['seconds']:6.1f} s" if s.get("seconds") is not None else "        "
        lines.append(f"  {n:14s} {st:12s} {secs}  {s.get('reason', '')}".rstrip())
    return lines


def verdict():
    bad = not_ok()
    if not bad:
        return f"PASS: all {len(ARGS.selected)} selected sections ok"
    return "FAIL: " + ", ".join(f"{n} {RESULTS['sections'][n]['status']}" for n in bad)


def timing_table():
    keyed = {}
    for r in RESULTS["timings"]:
        keyed.setdefault((r["variant"], r["op"], r["pass"]), {})[r["provider"]] = r
    lines = ["| variant | op | pass | eager ms | compile ms | fused ms | fused vs eager | fused vs compile | "
             "peak MiB eager / compile / fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (v, op, p), d in keyed.items():
        def ms(k):
            return d[k]["median_ms"] if k in d else None

        def mem(k):
            m = d.get(k, {}).get("peak_mem_mib")
            return "-" if m is None else f"{m:.0f}"

        e, c, f = ms("eager"), ms("compile"), ms("fused")
        fmt = lambda t: "-" if t is None else f"{t:.3f}"  # noqa: E731
        ve = f"{e / f:.2f}x" if e and f else "-"
        vc = f"{c / f:.2f}x" if c and f else "-"
        lines.append(f"| {v} | {op} | {p} | {fmt(e)} | {fmt(c)} | {fmt(f)} | {ve} | {vc} | "
                     f"{mem('eager')} / {mem('compile')} / {mem('fused')} |")
    return "\n".join(lines)


def _md_sections():
    out = [f"## Result: {verdict()}\n", f"- budget: {ARGS.budget_s:g} s from process start; used "
           f"{RESULTS['meta'].get('total_s', '?')} s (start-up {RESULTS['meta'].get('startup_s', '?')} s)", "",
           "| section | status | seconds | share s | reason |", "|---|---|---|---|---|"]
    for n in SECTIONS:
        s = RESULTS["sections"][n]
        st = s["status"] if s["status"] in ("ok", "not selected") else f"**{s['status'].upper()}**"
        out.append(f"| {n} | {st} | {s.get('seconds', '-')} | {s.get('share_s', '-')} | "
                   f"{s.get('reason', '')} |")
    return out


def markdown():
    m = RESULTS["meta"]
    out = ["# erw_fast fused-op GPU check\n", f"- device: {m.get('device')}", f"- torch {m.get('torch')}, "
           f"triton {m.get('triton')}, python {m.get('python')}", f"- mode: {m.get('mode')}", ""]
    out += _md_sections()
    corr = RESULTS["correctness"]
    bad = [r for r in corr if not r["ok"]]
    out.append(f"\n## Correctness vs float64: {len(corr) - len(bad)}/{len(corr)} passed\n")
    out.append("| op | case | tensor | rel err | tol | ok |\n|---|---|---|---|---|---|")
    for r in (bad + [r for r in corr if r["ok"]])[:400]:
        out.append(f"| {r['op']} | {r['case']} | {r['tensor']} | {r['rel_err']:.2e} | {r['tol']:.0e} | "
                   f"{'yes' if r['ok'] else '**NO**'} |")
    out.append("\n## Bandwidth (layernorm_modulate fwd+bwd)\n")
    for k, v in RESULTS["bandwidth"].items():
        if isinstance(v, dict):
            out.append(f"- {k}: {v['ms']:.3f} ms, {v['GBps']:.0f} GB/s = {100 * v['frac_of_copy']:.1f}% of copy")
        else:
            out.append(f"- {k}: {v:.0f}")
    if RESULTS["sweep"]:
        out.append("\n| variant | block_t | warps | fwd ms | fwd GB/s | bwd ms | bwd GB/s |\n|---|---|---|---|---|---|---|")
        for s in RESULTS["sweep"]:
            out.append(f"| {s['variant']} | {s['block_t']} | {s['num_warps']} | {s['fwd_ms']:.3f} | "
                       f"{s['fwd_GBps']:.0f} | {s['bwd_ms']:.3f} | {s['bwd_GBps']:.0f} |")
    out.append("\n## projection_cosine_loss memory (fwd+bwd)\n")
    out.append("```\n" + json.dumps(RESULTS["memory"], indent=1) + "\n```")
    out.append("\n## Timings (median ms)\n")
    out.append(timing_table())
    out += fp8_markdown()
    if RESULTS["steps"]:
        out.append("\n## Training steps\n")
        out.append(f"budget given: {RESULTS['steps'].get('budget_s')} s; table in step_results.md\n")
        out.append("```\n" + RESULTS["steps"].get("table", "") + "\n```")
    if RESULTS["errors"]:
        out.append("\n## Errors\n")
        for e in RESULTS["errors"]:
            out.append(f"- {e.get('section')} {e.get('case', '')}: {e['error']}")
    return "\n".join(out) + "\n"


def fp8_markdown():
    f = RESULTS["fp8"]
    if not f:
        return []
    out = ["\n## fp8 (torchao float8 linears) vs bf16, full ERW step\n"]
    if f.get("not_run"):
        return out + [f"not run: {f['not_run']}"]
    if "fp8" not in f:
        return out + ["did not finish within its share of the budget"]
    out += [f"{f['size']}, batch {f['batch']}, {f['steps']} steps from the same weights and batches, recipe "
            f"{f['recipe']}, compiled: {f['compile']}\n",
            "| precision | img/s | MFU (bf16 peak) | first step s | mean loss | last loss |", "|---|---|---|---|---|---|"]
    for name in ("bf16", "fp8"):
        r = f[name]
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        out.append(f"| {name} | {r['img_per_s']:.1f} | {mfu} | {r['first_step_s']:.1f} | "
                   f"{sum(r['losses']) / len(r['losses']):.4f} | {r['losses'][-1]:.4f} |")
    out.append(f"\nfp8/bf16 speed {f['speedup']:.2f}x; mean loss relative difference {f['mean_loss_rel_diff']:.2%}")
    return out


def finish():
    """Write the results, print the per-section summary; -> exit status (0 / 1)."""
    RESULTS["meta"]["total_s"] = round(time.time() - T_START, 1)
    rc = 1 if not_ok() else 0
    RESULTS["meta"]["exit_status"] = rc
    save()
    print(f"\n== sections (budget {ARGS.budget_s:g} s, used {RESULTS['meta']['total_s']} s)")
    print("\n".join(section_lines()))
    print(f"gpu_check: {verdict()}; results in {ARGS.outdir}", flush=True)
    return rc


def _hard_stop():
    """The watchdog: at the bound, whatever runs is marked failed, the rest skipped; write, exit 1."""
    got = LOCK.acquire(timeout=3)  # if a save is stuck, report anyway
    if STATE["done"]:  # the main thread is writing the final results
        if got:
            LOCK.release()
        return
    try:
        STATE["done"] = True
        cur = STATE["running"]
        for n in ARGS.selected:
            s = RESULTS["sections"][n]
            if n == cur:
                s.update(status="failed", seconds=round(time.time() - s["t0"], 1),
                         reason=f"hard wall-clock bound (--budget-s {ARGS.budget_s:g}) reached while it ran; "
                                "the process was stopped")
            elif s["status"] == "pending":
                s.update(status="skipped", reason=f"hard wall-clock bound (--budget-s {ARGS.budget_s:g}) "
                                                  "reached before it could start")
        print(f"\n!! gpu_check: --budget-s {ARGS.budget_s:g} s reached, stopping", flush=True)
        rc = finish()
    except BaseException:  # pragma: no cover - the exit below must happen
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 1)


def _start_watchdog():
    delay = max(0.0, T_START + ARGS.budget_s - HARD_MARGIN_S - time.time())
    t = threading.Timer(delay, _hard_stop)
    t.daemon = True
    t.start()
    return t


def init(t_start, doc):
    """Parse the command line (after the dependency check), mark the sections, start the watchdog."""
    global ARGS, T_START, WATCHDOG
    T_START = t_start
    if not {"-h", "--help"} & set(sys.argv[1:]):
        _check_deps()
    ARGS = _parse(doc=doc)
    RESULTS["meta"].update(mode="dry-run" if ARGS.dry_run else "cuda", budget_s=ARGS.budget_s)
    for n in SECTIONS:
        RESULTS["sections"][n] = {"status": "pending"} if n in ARGS.selected else \
            {"status": "not selected", "reason": ARGS.deselected[n]}
    WATCHDOG = _start_watchdog()
    return ARGS

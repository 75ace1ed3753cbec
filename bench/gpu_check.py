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
  steps          training-step benchmarks, naive vs ours (bench/step_bench.py) -> OUTDIR/step_results.*
The dry run runs every section at tiny sizes on CPU (memory: code path only; compile_fused with the
aot_eager backend; steps: the small digits config, eager, batch 8).

Budget: one hard wall-clock bound, ``--budget-s`` (default 270) counted from process start (before
torch is imported).  A section starts only when at least its minimum time is left, else it is recorded
as skipped; a started section gets its share of what is left (by its weight, the last one all of it)
and stops at the end of its share, recording the parts it did not run; the step benchmark is given
the remaining seconds minus a margin.  A watchdog ends the process at the bound whatever is running,
after writing the results with that section marked failed.

Writes OUTDIR/results.json (everything) and OUTDIR/results.md (tables) after every section, prints
the tables and a per-section summary last.  Exit status: 0 when every selected section ran to the
end and passed; 1 when any failed, was skipped (budget) or stopped early; 2 when a dependency is
missing or no CUDA device is present without --dry-run.
"""
import time

T_START = time.time()  # the budget counts from here: before torch, triton and CUDA start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (weight: expected CUDA seconds, the share of the budget; minimum seconds to start on CUDA,
# in the dry run; one-line description).  Dict order is run order.
SECTIONS = {
    "correctness": (60, 10, 3, "every kernel vs float64: dtypes, gradients, NaN-poison, masks, determinism"),
    "timings": (50, 15, 1, "eager / torch.compile / fused median ms, fwd and fwd+bwd, SiT-XL/2 sizes"),
    "bandwidth": (8, 3, 0.5, "layernorm_modulate fwd+bwd GB/s vs device-to-device copy"),
    "memory": (5, 2, 0.5, "projection_cosine_loss peak memory fused vs eager (CPU: code path only)"),
    "compile_fused": (30, 30, 2, "torch.compile(fullgraph) of the custom ops under bf16 autocast vs eager"),
    "sweep": (20, 5, 0.5, "tile-size sweep of the layernorm_modulate kernels"),
    "steps": (120, 80, 6, "training-step benchmark naive vs ours (bench/step_bench.py)"),
}
END_MARGIN_S = 3.0    # kept free at the end of the budget for the summary and the last write
STEPS_MARGIN_S = {True: 10.0, False: 2.0}  # [cuda]: taken off the step benchmark's (soft) budget
HARD_MARGIN_S = 1.0   # the watchdog fires this long before the bound, to write the results


# ------------------------------------------------------------------------------------------------
# command line and dependencies (no torch yet)
# ------------------------------------------------------------------------------------------------
def _names(text, p, flag):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        p.error(f"{flag}: unknown section(s) {', '.join(bad)}; sections: {', '.join(SECTIONS)}")
    return names


def _parse(argv=None):
    epilog = "sections, in run order (weight = share of the budget, min = seconds needed to start on CUDA):\n" + \
        "\n".join(f"  {n:14s} weight {w:3d}, min {m:3d} s: {d}" for n, (w, m, _, d) in SECTIONS.items()) + \
        "\nexit status: 0 every selected section ok; 1 one failed, was skipped (budget) or stopped early; " \
        "2 numpy/triton missing, or no CUDA device without --dry-run"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=epilog,
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
# ------------------------------------------------------------------------------------------------
RESULTS = {"meta": {}, "sections": {}, "correctness": [], "timings": [], "bandwidth": {}, "memory": {},
           "sweep": [], "steps": {}, "errors": []}
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
    if RESULTS["steps"]:
        out.append("\n## Training steps\n")
        out.append(f"budget given: {RESULTS['steps'].get('budget_s')} s; table in step_results.md\n")
        out.append("```\n" + RESULTS["steps"].get("table", "") + "\n```")
    if RESULTS["errors"]:
        out.append("\n## Errors\n")
        for e in RESULTS["errors"]:
            out.append(f"- {e.get('section')} {e.get('case', '')}: {e['error']}")
    return "\n".join(out) + "\n"


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


if "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
if not {"-h", "--help"} & set(sys.argv[1:]):
    _check_deps()
ARGS = _parse()
RESULTS["meta"].update(mode="dry-run" if ARGS.dry_run else "cuda", budget_s=ARGS.budget_s)
for _n in SECTIONS:
    RESULTS["sections"][_n] = {"status": "pending"} if _n in ARGS.selected else \
        {"status": "not selected", "reason": ARGS.deselected[_n]}
WATCHDOG = _start_watchdog()

import torch  # noqa: E402


def _import_ops():
    try:
        import erw_fast.kernels  # noqa: F401
    except ImportError:  # not pip-installed: import the package from this checkout
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
    import erw_fast.kernels as K
    import erw_fast.ops as ops

    return K, ops


K, ops = _import_ops()
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench_ops, step_bench
CUDA = torch.cuda.is_available() and not ARGS.dry_run
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# ------------------------------------------------------------------------------------------------
# sections: budget shares and the guarded runner
# ------------------------------------------------------------------------------------------------
class Ctx:
    """What a running section knows about its time: ``left()``, ``over(part)`` (True once its share
    is spent; the part is recorded as not run), ``fail(msg)`` (a failed check) and ``not_run(part)``
    (a part left out for another reason, given in ``part``)."""

    def __init__(self, name, share_s):
        self.name, self.share_s, self.t0 = name, share_s, time.time()
        self.failures, self.cut, self.left_out = [], [], []

    def left(self):
        return self.share_s - (time.time() - self.t0)

    def over(self, part):
        if self.left() > 0:
            return False
        self.cut.append(part)
        return True

    def fail(self, msg):
        self.failures.append(msg)
        print(f"   FAIL {self.name}: {msg}", flush=True)

    def not_run(self, part):
        self.left_out.append(part)


def time_left():
    """Seconds the sections may still use (the hard bound minus the end margin)."""
    return ARGS.budget_s - END_MARGIN_S - (time.time() - T_START)


def _min_start_s(name):
    _, cuda_min, dry_min, _ = SECTIONS[name]
    return ARGS.min_s.get(name, cuda_min if CUDA else dry_min)


def _share_s(name):
    pending = [n for n in ARGS.selected if RESULTS["sections"][n]["status"] == "pending"]
    left = time_left()
    if pending[-1] == name:
        return left
    share = left * SECTIONS[name][0] / sum(SECTIONS[n][0] for n in pending)
    return min(left, max(share, _min_start_s(name)))


def _status(ctx, exc):
    def listing(parts):
        return ", ".join(parts[:4]) + (f" (+{len(parts) - 4} more)" if len(parts) > 4 else "")

    missing = ([f"not run, its {ctx.share_s:.0f} s share of the budget spent: {listing(ctx.cut)}"] if ctx.cut else []) + \
        ([f"not run: {listing(ctx.left_out)}"] if ctx.left_out else [])
    failed = ([repr(exc)[:300]] if exc is not None else []) + ctx.failures
    if failed:
        return "failed", "; ".join(failed + missing)[:700]
    if missing:
        return "incomplete", "; ".join(missing)[:700]
    return "ok", ""


def run_section(name, fn):
    s = RESULTS["sections"][name]
    left, need = time_left(), _min_start_s(name)
    if left < need:
        s.update(status="skipped", reason=f"time budget: {max(left, 0):.1f} s left of --budget-s "
                                          f"{ARGS.budget_s:g}, the section needs >= {need:.1f} s to start")
        print(f"== {name}: SKIPPED ({s['reason']})", flush=True)
        save()
        return
    ctx = Ctx(name, _share_s(name))
    print(f"== {name} (share {ctx.share_s:.0f} s of {left:.0f} s left) ...", flush=True)
    with LOCK:
        STATE["running"] = name
        s.update(t0=ctx.t0, share_s=round(ctx.share_s, 1))
    exc = None
    try:
        if name in ARGS.fail_section:
            raise RuntimeError(f"injected failure (--fail-section {name})")
        while name in ARGS.stall_section:  # until the watchdog ends the process
            time.sleep(0.1)
        fn(ctx)
    except Exception as e:  # record and continue with the next section
        exc = e
        RESULTS["errors"].append({"section": name, "error": repr(e), "traceback": traceback.format_exc()})
        print(f"!! {name} failed: {e!r}", flush=True)
    with LOCK:
        STATE["running"] = None
        status, reason = _status(ctx, exc)
        s.update(status=status, reason=reason, seconds=round(time.time() - ctx.t0, 1))
        s.pop("t0", None)
        if status != "ok":
            print(f"!! {name}: {status.upper()}: {reason}", flush=True)
        save()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn):
    """Median ms.  CUDA: triton.testing.do_bench; CPU (dry run): a few perf_counter rounds."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def rel(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _rnd(g, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale + shift).to(dtype)


def _sizes():
    if CUDA:
        return dict(B=256, T=256, D=1152, N=65536, K=2048, Z=768, dtype=torch.bfloat16)
    return dict(B=2, T=16, D=72, N=128, K=64, Z=48, dtype=torch.float32)


def _load_bench():
    import bench_ops  # no pytest needed: it only guards its pytest-benchmark case

    return bench_ops


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------
def _record(op, case, name, err, tol):
    ok = err < tol
    RESULTS["correctness"].append({"op": op, "case": case, "tensor": name, "rel_err": err, "tol": tol, "ok": ok})
    if not ok:
        print(f"   FAIL {op} {case} {name}: rel err {err:.3e} >= {tol:.0e}", flush=True)


def _check_op(op, case, *args, **kwargs):
    try:
        _check_op_impl(op, case, *args, **kwargs)
    except Exception as e:  # one broken case must not hide the others
        RESULTS["correctness"].append({"op": op, "case": case, "tensor": "exception", "rel_err": float("inf"),
                                       "tol": 0.0, "ok": False, "error": repr(e)})
        RESULTS["errors"].append({"section": "correctness", "case": f"{op} {case}", "error": repr(e),
                                  "traceback": traceback.format_exc()})
        print(f"   EXCEPTION {op} {case}: {e!r}", flush=True)


def _check_op_impl(op, case, fused_fn, ref_fn, inputs, diff_idx, grad_out, tol_override=None):
    ins = [t.detach().requires_grad_() if i in diff_idx else t for i, t in enumerate(inputs)]
    out = fused_fn(*ins)
    leaves = [ins[i] for i in diff_idx]
    grads = torch.autograd.grad(out, leaves, grad_out)
    ins64 = [t.detach().double().requires_grad_() if i in diff_idx else t.double() for i, t in enumerate(inputs)]
    ref = ref_fn(*ins64)
    ref_grads = torch.autograd.grad(ref, [ins64[i] for i in diff_idx],
                                    None if grad_out is None else grad_out.double())
    lowp = any(t.dtype in (torch.bfloat16, torch.float16) for t in inputs)
    _record(op, case, "out", rel(out, ref), tol_override or TOL[out.dtype if not lowp or out.dim() else torch.bfloat16])
    for i, g, r in zip(diff_idx, grads, ref_grads):
        ok_dtype = g.dtype == inputs[i].dtype
        tol = tol_override or (TOL[torch.bfloat16] if lowp and op == "projection_cosine_loss" else TOL[g.dtype])
        _record(op, case, f"grad[{i}]", rel(g, r) if ok_dtype else float("inf"), tol)


def _correct_adaln(ctx, g, dtypes):
    # each distinct shape class x dtype costs a Triton compile on a fresh machine: keep the list short
    shapes = [(2, 17, 1000), (1, 1, 1152), (3, 256, 216)] if not CUDA else \
        [(2, 17, 1000), (1, 1, 1152), (8, 256, 1152)]
    for (B, T, D) in shapes:
        for dn, (xdt, mdt) in dtypes.items():
            case = f"B{B}T{T}D{D}-{dn}"
            if ctx.over(f"layernorm_modulate/gated_residual {case}"):
                continue
            ada = _rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
            x = _rnd(g, B, T, D, dtype=xdt, scale=2.0, shift=0.5)
            odt = torch.promote_types(xdt, mdt)
            dy = _rnd(g, B, T, D, dtype=odt)
            _check_op("layernorm_modulate", case,
                      lambda a, b, c: ops.layernorm_modulate(a, b, c, backend="triton"),
                      ops.layernorm_modulate_ref, [x, ada[:, :D], ada[:, D:2 * D]], [0, 1, 2], dy)
            y = _rnd(g, B, T, D, dtype=mdt)
            _check_op("gated_residual", case,
                      lambda a, b, c: ops.gated_residual(a, b, c, backend="triton"),
                      ops.gated_residual_ref, [x, ada[:, 2 * D:3 * D], y], [0, 1, 2], dy)


def _correct_loss(ctx, g):
    lshapes = [(300, 96, 100), (257, 2048, 768)] + ([(8192, 2048, 768)] if CUDA else [])
    for (N, Kd, Z) in lshapes:
        for dn, (hdt, wdt) in {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2,
                               "mixed": (torch.bfloat16, torch.float32)}.items():
            case = f"N{N}K{Kd}Z{Z}-{dn}"
            if ctx.over(f"projection_cosine_loss {case}"):
                continue
            h = _rnd(g, N, Kd)
            w = _rnd(g, Z, Kd, scale=Kd ** -0.5)
            b = _rnd(g, Z, scale=0.1)
            z = h @ w.T + b
            t = (z + 0.7 * z.std() * _rnd(g, N, Z)).to(hdt)
            for chunk in ([None, 1000] if N > 1000 else [None, 64]):
                _check_op("projection_cosine_loss", f"{case}-chunk{chunk}",
                          lambda a, bb, c, d: ops.projection_cosine_loss(a, bb, c, d, backend="triton",
                                                                         chunk_size=chunk) * 3.0,
                          lambda a, bb, c, d: ops.projection_cosine_loss_ref(a, bb, c, d) * 3.0,
                          [h.to(hdt), w.to(wdt), b.to(wdt), t], [0, 1, 2], None)


def _correct_determinism(g):
    """Bitwise determinism of the split reductions (several T-splits per batch row on CUDA)."""
    from erw_fast.kernels.gated_residual import gated_residual_bwd
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd

    B, T, D = (16, 256, 1152) if CUDA else (2, 37, 200)
    x, dy, sc = _rnd(g, B, T, D), _rnd(g, B, T, D), _rnd(g, B, D)
    a1 = layernorm_modulate_bwd(dy, x, sc, 1e-6, splits=4)
    a2 = layernorm_modulate_bwd(dy, x, sc, 1e-6, splits=4)
    b1 = gated_residual_bwd(dy, sc, x, splits=4)
    b2 = gated_residual_bwd(dy, sc, x, splits=4)
    det = all(torch.equal(p, q) for p, q in zip(a1 + b1, a2 + b2))
    RESULTS["correctness"].append({"op": "determinism", "case": f"B{B}T{T}D{D}", "tensor": "bwd x2 bitwise",
                                   "rel_err": 0.0 if det else float("inf"), "tol": 0.0, "ok": det})


def correctness(ctx):
    K.POISON = True
    try:
        g = torch.Generator(device=DEV).manual_seed(0)
        dtypes = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                  "mixed": (torch.float32, torch.bfloat16)}
        _correct_adaln(ctx, g, dtypes)
        _correct_loss(ctx, g)
        if not ctx.over("determinism"):
            _correct_determinism(g)
    finally:
        K.POISON = False
    corr = [r for r in RESULTS["correctness"] if r["op"] != "compile_fused"]
    bad = [r for r in corr if not r["ok"]]
    print(f"   {len(corr) - len(bad)}/{len(corr)} checks passed", flush=True)
    if bad or not corr:
        first = bad[0] if bad else {}
        ctx.fail(f"{len(bad)}/{len(corr)} checks failed, first: {first.get('op')} {first.get('case')} "
                 f"{first.get('tensor')} rel err {first.get('rel_err', 0):.2e}" if bad else "no check ran")


# ------------------------------------------------------------------------------------------------
# 2. timings
# ------------------------------------------------------------------------------------------------
def _timing_cases(bo):
    sizes = _sizes()
    providers = ["eager", "fused"] + ([] if (ARGS.no_compile or not CUDA) else ["compile"])
    variants = [(str(sizes["dtype"]).replace("torch.", ""), sizes)]
    if CUDA:
        variants.append(("x-fp32/mod-bf16", dict(sizes, dtype="mixed")))
    for vname, sz in variants:
        for op in bo.OPS:
            if sz["dtype"] == "mixed" and op == "projection_cosine_loss":
                continue
            for pass_ in bo.PASSES:
                for prov in providers:
                    if prov == "compile" and sz["dtype"] == "mixed" and (op, pass_) != ("layernorm_modulate", "fwdbwd"):
                        continue  # inductor compiles are the slow part of this section
                    yield vname, sz, op, pass_, prov


def timings(ctx):
    bo = _load_bench()
    n_err = 0
    for vname, sz, op, pass_, prov in _timing_cases(bo):
        if ctx.over(f"{vname} {op} {pass_} {prov}"):
            continue
        try:
            run = _runner(bo, op, pass_, prov, sz)
            run()  # warm-up / compile
            ms = bench_ms(run)
            mem = bo.peak_mem_mib(run) if CUDA else None
            RESULTS["timings"].append({"variant": vname, "op": op, "pass": pass_, "provider": prov,
                                       "median_ms": ms, "peak_mem_mib": mem})
            print(f"   {vname:16s} {op:24s} {pass_:7s} {prov:8s} {ms:9.3f} ms", flush=True)
        except Exception as e:
            n_err += 1
            RESULTS["errors"].append({"section": "timings", "case": f"{vname} {op} {pass_} {prov}",
                                      "error": repr(e), "traceback": traceback.format_exc()})
            print(f"!! {vname} {op} {pass_} {prov}: {e!r}", flush=True)
        save()
    if n_err:
        ctx.fail(f"{n_err} timing case(s) raised (see errors)")


def _runner(bo, op, pass_, prov, sz):
    if sz["dtype"] != "mixed":
        return bo.make_runner(op, pass_, prov, sz, DEV)
    # fp32 residual stream (x, and the output) with bf16 modulation vectors, as under bf16 autocast
    args, leaves, grad_out = bo.make_inputs(op, pass_ == "fwdbwd", dict(sz, dtype=torch.bfloat16), DEV)
    x = args[0].detach().float().requires_grad_(pass_ == "fwdbwd")
    args[0] = x
    if leaves:
        leaves[0] = x
    grad_out = grad_out.float()
    fn = bo.get_fn(op, prov)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(*args)
            sync()
    else:
        def run():
            out = fn(*args)
            torch.autograd.grad(out, leaves, grad_out)
            sync()
    return run


# ------------------------------------------------------------------------------------------------
# 3. bandwidth
# ------------------------------------------------------------------------------------------------
def _adaln_inputs(g, B, T, D, xdt, mdt):
    x = _rnd(g, B, T, D, dtype=xdt)
    ada = _rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
    odt = torch.promote_types(xdt, mdt)
    dy = _rnd(g, B, T, D, dtype=odt)
    return x, ada[:, :D], ada[:, D:2 * D], dy, odt


def bandwidth(ctx):
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd, layernorm_modulate_fwd

    sz = _sizes()
    B, T, D = sz["B"], sz["T"], sz["D"]
    n = B * T * D
    # device-to-device copy bandwidth (read + write), 1 GiB source on CUDA
    numel = (1 << 28) if CUDA else (1 << 20)
    src = torch.randn(numel, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * numel * 4 / (copy_ms * 1e-3) / 1e9
    del src, dst
    RESULTS["bandwidth"]["copy_GBps"] = copy_gbs
    g = torch.Generator(device=DEV).manual_seed(1)
    for vname, xdt, mdt in (("bf16", torch.bfloat16, torch.bfloat16), ("x-fp32/mod-bf16", torch.float32, torch.bfloat16)):
        if ctx.over(vname):
            continue
        x, shift, scale, dy, odt = _adaln_inputs(g, B, T, D, xdt, mdt)
        ex, eo = x.element_size(), torch.empty((), dtype=odt).element_size()
        # fwd: read x, write out; bwd: read x + dy, write dx   (B*D vectors and partials ignored)
        bytes_fb = n * (ex + eo + ex + eo + ex)

        def kernels_only():
            layernorm_modulate_fwd(x, shift, scale, 1e-6, out_dtype=odt)
            layernorm_modulate_bwd(dy, x, scale, 1e-6)

        xr = x.detach().requires_grad_()
        sr, cr = shift.detach().requires_grad_(), scale.detach().requires_grad_()

        def op_fwd_bwd():
            out = ops.layernorm_modulate(xr, sr, cr, backend="triton")
            torch.autograd.grad(out, (xr, sr, cr), dy)

        for label, fn in (("kernels", kernels_only), ("op+autograd", op_fwd_bwd)):
            ms = bench_ms(fn)
            gbs = bytes_fb / (ms * 1e-3) / 1e9
            RESULTS["bandwidth"][f"{vname} {label}"] = {"ms": ms, "GBps": gbs, "frac_of_copy": gbs / copy_gbs,
                                                        "bytes": bytes_fb}
            print(f"   layernorm_modulate fwd+bwd {vname} {label}: {ms:.3f} ms, {gbs:.0f} GB/s = "
                  f"{100 * gbs / copy_gbs:.1f}% of copy ({copy_gbs:.0f} GB/s)", flush=True)
        del x, dy


def sweep(ctx):
    """Tile-size sweep of the layernorm_modulate kernels (data for choosing the defaults)."""
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd, layernorm_modulate_fwd

    sz = _sizes()
    B, T, D = sz["B"], sz["T"], sz["D"]
    n = B * T * D
    g = torch.Generator(device=DEV).manual_seed(2)
    tiles = ((1, 4), (1, 8), (2, 8), (2, 16), (4, 8), (4, 16)) if CUDA else ((2, 8),)
    n_err = 0
    for vname, xdt, mdt in (("x-fp32/mod-bf16", torch.float32, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16)):
        x, shift, scale, dy, odt = _adaln_inputs(g, B, T, D, xdt, mdt)
        ex, eo = x.element_size(), torch.empty((), dtype=odt).element_size()
        for bt, nw in tiles:
            if ctx.over(f"{vname} block_t={bt} warps={nw}"):
                continue
            try:
                f_ms = bench_ms(lambda: layernorm_modulate_fwd(x, shift, scale, 1e-6, out_dtype=odt,
                                                               block_t=bt, num_warps=nw))
                b_ms = bench_ms(lambda: layernorm_modulate_bwd(dy, x, scale, 1e-6, block_t=bt, num_warps=nw))
            except Exception as e:
                n_err += 1
                f_ms = b_ms = float("nan")
                RESULTS["errors"].append({"section": "sweep", "case": f"{vname} bt{bt} nw{nw}", "error": repr(e)})
            RESULTS["sweep"].append({"variant": vname, "kernel": "layernorm_modulate", "block_t": bt,
                                     "num_warps": nw, "fwd_ms": f_ms, "bwd_ms": b_ms,
                                     "fwd_GBps": n * (ex + eo) / (f_ms * 1e-3) / 1e9,
                                     "bwd_GBps": n * (2 * ex + eo) / (b_ms * 1e-3) / 1e9})
            print(f"   sweep {vname} block_t={bt} warps={nw}: fwd {f_ms:.3f} ms, bwd {b_ms:.3f} ms", flush=True)
        del x, dy
    if n_err:
        ctx.fail(f"{n_err} sweep configuration(s) raised (see errors)")


# ------------------------------------------------------------------------------------------------
# 4. memory of the fused loss
# ------------------------------------------------------------------------------------------------
def memory(ctx):
    """CUDA: peak memory above the inputs, fused vs eager.  Dry run: the same calls, no numbers.
    Both: the fused loss must equal the eager one (2e-2 relative)."""
    bo = _load_bench()
    sz = _sizes()
    losses = {}
    for prov in ("eager", "fused"):
        args, leaves, _ = bo.make_inputs("projection_cosine_loss", True, sz, DEV)
        fn = bo.get_fn("projection_cosine_loss", prov)
        if CUDA:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss = fn(*args)
        torch.autograd.grad(loss, leaves)
        losses[prov] = float(loss.detach())
        if CUDA:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            RESULTS["memory"][prov] = {"peak_above_inputs_mib": (peak - base) / 2 ** 20,
                                       "peak_total_mib": peak / 2 ** 20, "inputs_mib": base / 2 ** 20}
        else:
            RESULTS["memory"][prov] = {"note": "dry run: code path only (no CUDA memory statistics)"}
        RESULTS["memory"][prov]["loss"] = losses[prov]
        del args, leaves, loss
        if CUDA:
            torch.cuda.empty_cache()
    err = abs(losses["fused"] - losses["eager"]) / max(abs(losses["eager"]), 1e-30)
    RESULTS["memory"]["loss_rel_err"] = err
    if not err < 2e-2:
        ctx.fail(f"fused loss {losses['fused']:.6g} vs eager {losses['eager']:.6g} (rel err {err:.2e})")
    if not CUDA:
        return
    e, f = RESULTS["memory"]["eager"], RESULTS["memory"]["fused"]
    RESULTS["memory"]["ratio_above_inputs"] = f["peak_above_inputs_mib"] / e["peak_above_inputs_mib"]
    RESULTS["memory"]["ratio_total"] = f["peak_total_mib"] / e["peak_total_mib"]
    print(f"   projection_cosine_loss N={sz['N']} fwd+bwd peak above inputs: fused "
          f"{f['peak_above_inputs_mib']:.0f} MiB vs eager {e['peak_above_inputs_mib']:.0f} MiB "
          f"(x{RESULTS['memory']['ratio_above_inputs']:.2f}); total x{RESULTS['memory']['ratio_total']:.2f}",
          flush=True)


# ------------------------------------------------------------------------------------------------
# 5. the custom ops inside torch.compile, under autocast
# ------------------------------------------------------------------------------------------------
def _block(D, Z):
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ada = nn.Linear(D, 3 * D)
            self.fc = nn.Linear(D, D)
            self.proj = nn.Linear(D, Z)

        def forward(self, x, c, target, backend="auto"):
            shift, scale, gate = self.ada(c).chunk(3, dim=1)
            h = ops.layernorm_modulate(x, shift, scale, backend=backend)
            x = ops.gated_residual(x, gate, self.fc(h), backend=backend)
            loss = ops.projection_cosine_loss(x.reshape(-1, x.shape[-1]), self.proj.weight, self.proj.bias,
                                              target, backend=backend)
            return x, loss

    return Block()


def compile_fused(ctx):
    """torch.compile(fullgraph=True) of a small adaLN block + loss written with the fused ops
    (CUDA: inductor, backend auto -> Triton inside the compiled graph; dry run: aot_eager, backend
    triton -> the interpreter) under bf16 autocast matches eager, and kernels ran."""
    B, T, D, Z = (4, 256, 1152, 768) if CUDA else (2, 16, 72, 48)
    torch.manual_seed(0)
    m = _block(D, Z).to(DEV)
    x = torch.randn(B, T, D, device=DEV)
    c = torch.randn(B, D, device=DEV)
    t = torch.randn(B * T, Z, device=DEV)

    def run(fn, backend):
        m.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out, loss = fn(x, c, t, backend)
        (out.float().square().mean() + loss).backward()
        return out.float(), loss, [p.grad.clone() for p in m.parameters()]

    ref = run(m, "torch")
    before = sum(K.LAUNCHES.values())
    compiled = torch.compile(m, fullgraph=True, **({} if CUDA else {"backend": "aot_eager"}))
    got = run(compiled, "auto" if CUDA else "triton")
    launched = sum(K.LAUNCHES.values()) - before
    errs = {"out": rel(got[0], ref[0]), "loss": rel(got[1], ref[1])}
    errs.update({f"grad{i}": rel(a, b) for i, (a, b) in enumerate(zip(got[2], ref[2]))})
    ok = launched > 0 and all(e < 2e-2 for e in errs.values())
    RESULTS["compile_fused"] = {"kernel_launches": launched, "rel_err": errs, "ok": ok,
                                "compile_backend": "inductor" if CUDA else "aot_eager"}
    RESULTS["correctness"].append({"op": "compile_fused", "case": "adaLN block + loss, bf16 autocast",
                                   "tensor": "out/loss/grads", "rel_err": max(errs.values()), "tol": 2e-2,
                                   "ok": ok})
    print(f"   compiled fused block: {launched} kernel launches, max rel err {max(errs.values()):.2e}", flush=True)
    if not ok:
        ctx.fail(f"{launched} kernel launches, max rel err {max(errs.values()):.2e} (need > 0 and < 2e-2)")


# ------------------------------------------------------------------------------------------------
# 6. training-step benchmarks
# ------------------------------------------------------------------------------------------------
def steps(ctx):
    """bench/step_bench.py with the remaining budget (minus a margin: its budget is soft)."""
    from step_bench import markdown_table, run_step_benchmarks

    budget = max(0.0, ctx.left() - STEPS_MARGIN_S[CUDA])
    if CUDA:
        sizes, kw = tuple(s for s in ARGS.step_sizes.split(",") if s), {}
    else:  # the small digits config, eager, a small batch: the code path in a few seconds
        sizes, kw = ("small",), dict(batch=8, rounds=3, compile=False, compile_margin_s=3.0)
    RESULTS["steps"] = {"budget_s": round(budget, 1), "sizes": list(sizes)}
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)  # as step_bench.py on CPU: a shared box's OpenMP barriers make outliers
    try:
        res = run_step_benchmarks(ARGS.outdir, DEV, sizes, budget_s=budget, **kw)
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


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
FUNCS = {"correctness": correctness, "timings": timings, "bandwidth": bandwidth, "memory": memory,
         "compile_fused": compile_fused, "sweep": sweep, "steps": steps}
assert list(FUNCS) == list(SECTIONS)


def _no_cuda():
    msg = ("gpu_check: no CUDA device here. Run it on a GPU machine, or use --dry-run to exercise the "
           "script on CPU through the Triton interpreter (tiny sizes).")
    with LOCK:
        STATE["done"] = True
    WATCHDOG.cancel()
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
        mode="cuda" if CUDA else "dry-run", sizes={k: str(v) for k, v in _sizes().items()},
        budget_s=ARGS.budget_s, selected=ARGS.selected, startup_s=round(time.time() - T_START, 1))
    print(f"gpu_check: {RESULTS['meta']['device']}, budget {ARGS.budget_s:g} s, start-up took "
          f"{RESULTS['meta']['startup_s']} s; sections: {', '.join(ARGS.selected)}", flush=True)
    for name in ARGS.selected:
        run_section(name, FUNCS[name])
    with LOCK:
        if STATE["done"]:  # the watchdog is writing the results and ends the process
            time.sleep(60)
        STATE["done"] = True
        WATCHDOG.cancel()
        _print_tables()
        return finish()


if __name__ == "__main__":
    sys.exit(main())

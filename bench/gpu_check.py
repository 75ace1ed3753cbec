#!/usr/bin/env python
"""One-command GPU check of the fused ops: correctness first, then timings; results to OUTDIR.

    python3 -m pip install --no-deps --no-build-isolation -e .     # once, on the GPU machine
    python bench/gpu_check.py OUTDIR            # CUDA: full check (< 3 min on one H100)
    python bench/gpu_check.py OUTDIR --dry-run  # no GPU needed: tiny sizes, Triton interpreter on CPU

Sections (each guarded: a failure is recorded and the script goes on):
  1. correctness: every kernel (layernorm_modulate, gated_residual, projection_cosine_loss) against
     a float64 reference: fp32, bf16 and mixed (fp32 x / bf16 modulation) inputs, forward and every
     gradient, NaN-poisoned buffers, masked (non power of two) shapes; bitwise determinism of the
     backward reductions.
  2. timings at SiT-XL/2 sizes (B*T = 256*256, D = 1152; N = 65536, K = 2048, Z = 768; bf16):
     eager reference / torch.compile(reference) / fused, fwd and fwd+bwd,
     ``triton.testing.do_bench`` median.
  3. layernorm_modulate fwd+bwd achieved bandwidth vs a measured device-to-device copy bandwidth
     (also for fp32 x with bf16 shift/scale -- the layout under bf16 autocast), plus a small
     tile-size sweep of the two kernels.
  4. projection_cosine_loss peak memory (fwd+bwd, above the inputs) vs eager at N = 65536.
Writes OUTDIR/results.json (everything) and OUTDIR/results.md (tables), and prints the summary
table last.  Exit status: 0 when every correctness check passed, 1 otherwise, 2 when no CUDA
device is present and --dry-run was not given.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: tiny sizes through the Triton interpreter, no compile provider")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="soft time budget: optional parts (compile of the mixed variant, the sweep) are "
                        "skipped once it is spent (default 170)")
    return p.parse_args()


ARGS = _parse()
if ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402


def _import_ops():
    try:
        import erw_fast.kernels  # noqa: F401
    except ImportError:
        # not pip-installed: the top-level kernels/ folder is erw_fast.kernels; make it findable.
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        import erw_fast

        if ROOT not in erw_fast.__path__:
            erw_fast.__path__.append(ROOT)  # erw_fast.kernels -> ROOT/kernels
    import erw_fast.kernels as K
    import erw_fast.ops as ops

    return K, ops


K, ops = _import_ops()

CUDA = torch.cuda.is_available() and not ARGS.dry_run
DEV = "cuda" if CUDA else "cpu"
T_START = time.time()


def time_left():
    return ARGS.budget_s - (time.time() - T_START)


RESULTS = {"meta": {}, "correctness": [], "timings": [], "bandwidth": {}, "memory": {}, "sweep": [],
           "errors": []}


def save():
    os.makedirs(ARGS.outdir, exist_ok=True)
    with open(os.path.join(ARGS.outdir, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(ARGS.outdir, "results.md"), "w") as f:
        f.write(markdown())


def section(name):
    def deco(fn):
        def wrapped(*a, **k):
            t0 = time.time()
            print(f"== {name} ...", flush=True)
            try:
                fn(*a, **k)
            except Exception as e:  # record and continue with the next section
                RESULTS["errors"].append({"section": name, "error": repr(e), "traceback": traceback.format_exc()})
                print(f"!! {name} failed: {e!r}", flush=True)
            RESULTS["meta"].setdefault("section_s", {})[name] = round(time.time() - t0, 1)
            save()
        return wrapped
    return deco


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


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


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


def _rnd(g, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g, device=DEV) * scale + shift).to(dtype)


@section("correctness")
def correctness():
    K.POISON = True
    g = torch.Generator(device=DEV).manual_seed(0)
    dtypes = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
              "mixed": (torch.float32, torch.bfloat16)}
    # each distinct shape class x dtype costs a Triton compile on a fresh machine: keep the list short
    shapes = [(2, 17, 1000), (1, 1, 1152), (3, 256, 216)] if not CUDA else \
        [(2, 17, 1000), (1, 1, 1152), (8, 256, 1152)]
    for (B, T, D) in shapes:
        for dn, (xdt, mdt) in dtypes.items():
            case = f"B{B}T{T}D{D}-{dn}"
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
    lshapes = [(300, 96, 100), (257, 2048, 768)] + ([(8192, 2048, 768)] if CUDA else [])
    for (N, Kd, Z) in lshapes:
        for dn, (hdt, wdt) in {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2,
                               "mixed": (torch.bfloat16, torch.float32)}.items():
            case = f"N{N}K{Kd}Z{Z}-{dn}"
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
    # determinism of the split reductions (several T-splits per batch row on CUDA)
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
    K.POISON = False
    n_ok = sum(r["ok"] for r in RESULTS["correctness"])
    print(f"   {n_ok}/{len(RESULTS['correctness'])} checks passed", flush=True)


# ------------------------------------------------------------------------------------------------
# 2. timings
# ------------------------------------------------------------------------------------------------
def _sizes():
    if CUDA:
        return dict(B=256, T=256, D=1152, N=65536, K=2048, Z=768, dtype=torch.bfloat16)
    return dict(B=2, T=16, D=72, N=128, K=64, Z=48, dtype=torch.float32)


def _load_bench():
    sys.path.insert(0, HERE)
    import bench_ops

    return bench_ops


@section("timings")
def timings():
    bo = _load_bench()
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
                    if prov == "compile" and sz["dtype"] == "mixed" and (
                            (op, pass_) != ("layernorm_modulate", "fwdbwd") or time_left() < 60):
                        continue  # inductor compiles are the slow part of this script
                    try:
                        run = _runner(bo, op, pass_, prov, sz)
                        run()  # warm-up / compile
                        ms = bench_ms(run)
                        mem = bo.peak_mem_mib(run) if CUDA else None
                        RESULTS["timings"].append({"variant": vname, "op": op, "pass": pass_, "provider": prov,
                                                   "median_ms": ms, "peak_mem_mib": mem})
                        print(f"   {vname:16s} {op:24s} {pass_:7s} {prov:8s} {ms:9.3f} ms", flush=True)
                    except Exception as e:
                        RESULTS["errors"].append({"section": "timings", "case": f"{vname} {op} {pass_} {prov}",
                                                  "error": repr(e), "traceback": traceback.format_exc()})
                        print(f"!! {vname} {op} {pass_} {prov}: {e!r}", flush=True)
                    save()


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
@section("bandwidth")
def bandwidth():
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
        x = _rnd(g, B, T, D, dtype=xdt)
        ada = _rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
        shift, scale = ada[:, :D], ada[:, D:2 * D]
        odt = torch.promote_types(xdt, mdt)
        dy = _rnd(g, B, T, D, dtype=odt)
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


@section("sweep")
def sweep():
    """Tile-size sweep of the layernorm_modulate kernels (data for choosing the defaults)."""
    if not CUDA or ARGS.no_sweep:
        return
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd, layernorm_modulate_fwd

    sz = _sizes()
    B, T, D = sz["B"], sz["T"], sz["D"]
    n = B * T * D
    g = torch.Generator(device=DEV).manual_seed(2)
    for vname, xdt, mdt in (("x-fp32/mod-bf16", torch.float32, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16)):
        x = _rnd(g, B, T, D, dtype=xdt)
        ada = _rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
        shift, scale = ada[:, :D], ada[:, D:2 * D]
        odt = torch.promote_types(xdt, mdt)
        dy = _rnd(g, B, T, D, dtype=odt)
        ex, eo = x.element_size(), torch.empty((), dtype=odt).element_size()
        for bt, nw in ((1, 4), (1, 8), (2, 8), (2, 16), (4, 8), (4, 16)):
            if True:
                if time_left() < 0:
                    print("   sweep: time budget spent, stopping", flush=True)
                    return
                try:
                    f_ms = bench_ms(lambda: layernorm_modulate_fwd(x, shift, scale, 1e-6, out_dtype=odt,
                                                                   block_t=bt, num_warps=nw))
                    b_ms = bench_ms(lambda: layernorm_modulate_bwd(dy, x, scale, 1e-6, block_t=bt, num_warps=nw))
                except Exception as e:
                    f_ms = b_ms = float("nan")
                    RESULTS["errors"].append({"section": "sweep", "case": f"{vname} bt{bt} nw{nw}", "error": repr(e)})
                RESULTS["sweep"].append({"variant": vname, "kernel": "layernorm_modulate", "block_t": bt,
                                         "num_warps": nw, "fwd_ms": f_ms, "bwd_ms": b_ms,
                                         "fwd_GBps": n * (ex + eo) / (f_ms * 1e-3) / 1e9,
                                         "bwd_GBps": n * (2 * ex + eo) / (b_ms * 1e-3) / 1e9})
                print(f"   sweep {vname} block_t={bt} warps={nw}: fwd {f_ms:.3f} ms, bwd {b_ms:.3f} ms", flush=True)
        del x, dy


# ------------------------------------------------------------------------------------------------
# 4. memory of the fused loss
# ------------------------------------------------------------------------------------------------
@section("memory")
def memory():
    if not CUDA:
        RESULTS["memory"]["note"] = "CUDA only (dry run)"
        return
    bo = _load_bench()
    sz = _sizes()
    for prov in ("eager", "fused"):
        args, leaves, _ = bo.make_inputs("projection_cosine_loss", True, sz, DEV)
        fn = bo.get_fn("projection_cosine_loss", prov)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(*args)
        torch.autograd.grad(loss, leaves)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        RESULTS["memory"][prov] = {"peak_above_inputs_mib": (peak - base) / 2 ** 20,
                                   "peak_total_mib": peak / 2 ** 20, "inputs_mib": base / 2 ** 20}
        del args, leaves, loss
        torch.cuda.empty_cache()
    e, f = RESULTS["memory"]["eager"], RESULTS["memory"]["fused"]
    RESULTS["memory"]["ratio_above_inputs"] = f["peak_above_inputs_mib"] / e["peak_above_inputs_mib"]
    RESULTS["memory"]["ratio_total"] = f["peak_total_mib"] / e["peak_total_mib"]
    print(f"   projection_cosine_loss N={sz['N']} fwd+bwd peak above inputs: fused "
          f"{f['peak_above_inputs_mib']:.0f} MiB vs eager {e['peak_above_inputs_mib']:.0f} MiB "
          f"(x{RESULTS['memory']['ratio_above_inputs']:.2f}); total x{RESULTS['memory']['ratio_total']:.2f}",
          flush=True)


@section("compile_fused")
def compile_fused():
    """torch.compile(fullgraph=True) of a small adaLN block + loss written with the fused ops
    (backend auto -> Triton inside the compiled graph on CUDA) matches eager, and kernels ran."""
    if not CUDA or ARGS.no_compile or time_left() < 30:
        RESULTS["compile_fused"] = {"skipped": True}
        return
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, D=1152, Z=768):
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

    torch.manual_seed(0)
    m = Block().to(DEV)
    x = torch.randn(4, 256, 1152, device=DEV)
    c = torch.randn(4, 1152, device=DEV)
    t = torch.randn(4 * 256, 768, device=DEV)

    def run(fn, backend):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, loss = fn(x, c, t, backend)
        (out.float().square().mean() + loss).backward()
        return out.float(), loss, [p.grad.clone() for p in m.parameters()]

    ref = run(m, "torch")
    before = sum(K.LAUNCHES.values())
    got = run(torch.compile(m, fullgraph=True), "auto")
    launched = sum(K.LAUNCHES.values()) - before
    errs = {"out": rel(got[0], ref[0]), "loss": rel(got[1], ref[1])}
    errs.update({f"grad{i}": rel(a, b) for i, (a, b) in enumerate(zip(got[2], ref[2]))})
    ok = launched > 0 and all(e < 2e-2 for e in errs.values())
    RESULTS["compile_fused"] = {"kernel_launches": launched, "rel_err": errs, "ok": ok}
    RESULTS["correctness"].append({"op": "compile_fused", "case": "adaLN block + loss, bf16 autocast",
                                   "tensor": "out/loss/grads", "rel_err": max(errs.values()), "tol": 2e-2,
                                   "ok": ok})
    print(f"   compiled fused block: {launched} kernel launches, max rel err {max(errs.values()):.2e}", flush=True)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def timing_table():
    rows = RESULTS["timings"]
    keyed = {}
    for r in rows:
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


def markdown():
    m = RESULTS["meta"]
    out = [f"# erw_fast fused-op GPU check\n", f"- device: {m.get('device')}", f"- torch {m.get('torch')}, "
           f"triton {m.get('triton')}, python {m.get('python')}", f"- mode: {m.get('mode')}", ""]
    corr = RESULTS["correctness"]
    bad = [r for r in corr if not r["ok"]]
    out.append(f"## Correctness vs float64: {len(corr) - len(bad)}/{len(corr)} passed\n")
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
    if RESULTS["errors"]:
        out.append("\n## Errors\n")
        for e in RESULTS["errors"]:
            out.append(f"- {e.get('section')} {e.get('case', '')}: {e['error']}")
    return "\n".join(out) + "\n"


def main():
    if not torch.cuda.is_available() and not ARGS.dry_run:
        msg = ("gpu_check: no CUDA device here. Run it on a GPU machine, or use --dry-run to exercise the "
               "script on CPU through the Triton interpreter (tiny sizes, no compile provider).")
        print(msg)
        os.makedirs(ARGS.outdir, exist_ok=True)
        with open(os.path.join(ARGS.outdir, "results.md"), "w") as f:
            f.write(msg + "\n")
        return 2
    import triton

    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are against fp64: no TF32
        torch.backends.cudnn.allow_tf32 = False
    RESULTS["meta"].update(
        device=torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        mode="cuda" if CUDA else "dry-run", sizes={k: str(v) for k, v in _sizes().items()})
    t0 = time.time()
    correctness()
    timings()
    bandwidth()
    memory()
    compile_fused()
    sweep()
    if CUDA:  # training-step benchmarks (bench/step_bench.py) -> OUTDIR/step_results.{md,json}
        from step_bench import markdown_table, run_step_benchmarks

        steps = run_step_benchmarks(ARGS.outdir, "cuda", budget_s=min(150.0, 280.0 - (time.time() - T_START)))
        print(markdown_table(steps["rows"]), flush=True)
    RESULTS["meta"]["total_s"] = round(time.time() - t0, 1)
    save()
    print("\n" + timing_table())
    bw = {k: v for k, v in RESULTS["bandwidth"].items() if isinstance(v, dict)}
    for k, v in bw.items():
        print(f"layernorm_modulate fwd+bwd {k}: {v['GBps']:.0f} GB/s = {100 * v['frac_of_copy']:.1f}% of copy")
    if "ratio_above_inputs" in RESULTS["memory"]:
        print(f"projection_cosine_loss peak memory fused/eager: above inputs x{RESULTS['memory']['ratio_above_inputs']:.2f}, "
              f"total x{RESULTS['memory']['ratio_total']:.2f}")
    corr = RESULTS["correctness"]
    n_ok = sum(r["ok"] for r in corr)
    print(f"correctness: {n_ok}/{len(corr)} passed; errors: {len(RESULTS['errors'])}; results in {ARGS.outdir}")
    return 0 if (n_ok == len(corr) and corr and not any(e["section"] == "correctness" for e in RESULTS["errors"])) else 1


if __name__ == "__main__":
    sys.exit(main())

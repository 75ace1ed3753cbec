"""Section ``correctness``: every kernel against a float64 reference (fp32, bf16, mixed inputs, every
gradient, NaN-poisoned buffers, masked shapes) and bitwise determinism of the split reductions."""
import traceback

import torch

from .common import RESULTS
from .device import CUDA, DEV, TOL, K, ops, rel, rnd

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
            ada = rnd(g, B, 6 * D, dtype=mdt, scale=0.5)
            x = rnd(g, B, T, D, dtype=xdt, scale=2.0, shift=0.5)
            odt = torch.promote_types(xdt, mdt)
            dy = rnd(g, B, T, D, dtype=odt)
            _check_op("layernorm_modulate", case,
                      lambda a, b, c: ops.layernorm_modulate(a, b, c, backend="triton"),
                      ops.layernorm_modulate_ref, [x, ada[:, :D], ada[:, D:2 * D]], [0, 1, 2], dy)
            y = rnd(g, B, T, D, dtype=mdt)
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
            h = rnd(g, N, Kd)
            w = rnd(g, Z, Kd, scale=Kd ** -0.5)
            b = rnd(g, Z, scale=0.1)
            z = h @ w.T + b
            t = (z + 0.7 * z.std() * rnd(g, N, Z)).to(hdt)
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
    x, dy, sc = rnd(g, B, T, D), rnd(g, B, T, D), rnd(g, B, D)
    a1 = layernorm_modulate_bwd(dy, x, sc, 1e-6, splits=4)
    a2 = layernorm_modulate_bwd(dy, x, sc, 1e-6, splits=4)
    b1 = gated_residual_bwd(dy, sc, x, splits=4)
    b2 = gated_residual_bwd(dy, sc, x, splits=4)
    det = all(torch.equal(p, q) for p, q in zip(a1 + b1, a2 + b2))
    RESULTS["correctness"].append({"op": "determinism", "case": f"B{B}T{T}D{D}", "tensor": "bwd x2 bitwise",
                                   "rel_err": 0.0 if det else float("inf"), "tol": 0.0, "ok": det})


def run(ctx):
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

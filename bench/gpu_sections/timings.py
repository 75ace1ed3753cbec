"""Section ``timings``: eager / torch.compile / fused median ms of each op, fwd and fwd+bwd, at
SiT-XL/2 sizes."""
import traceback

import torch

from . import common
from .common import RESULTS
from .device import CUDA, DEV, bench_ms, load_bench, op_sizes, sync

def _timing_cases(bo):
    sizes = op_sizes()
    providers = ["eager", "fused"] + ([] if (common.ARGS.no_compile or not CUDA) else ["compile"])
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


def run(ctx):
    bo = load_bench()
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
        common.save()
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

"""Section ``sweep``: a tile-size sweep of the layernorm_modulate kernels."""
import torch

from .common import RESULTS
from .device import CUDA, DEV, adaln_inputs, bench_ms, op_sizes

def run(ctx):
    """Tile-size sweep of the layernorm_modulate kernels (data for choosing the defaults)."""
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd, layernorm_modulate_fwd

    sz = op_sizes()
    B, T, D = sz["B"], sz["T"], sz["D"]
    n = B * T * D
    g = torch.Generator(device=DEV).manual_seed(2)
    tiles = ((1, 4), (1, 8), (2, 8), (2, 16), (4, 8), (4, 16)) if CUDA else ((2, 8),)
    n_err = 0
    for vname, xdt, mdt in (("x-fp32/mod-bf16", torch.float32, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16)):
        x, shift, scale, dy, odt = adaln_inputs(g, B, T, D, xdt, mdt)
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

"""Section ``bandwidth``: layernorm_modulate fwd+bwd achieved bandwidth against a measured
device-to-device copy."""
import torch

from .common import RESULTS
from .device import CUDA, DEV, adaln_inputs, bench_ms, ops, op_sizes

def run(ctx):
    from erw_fast.kernels.layernorm_modulate import layernorm_modulate_bwd, layernorm_modulate_fwd

    sz = op_sizes()
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
        x, shift, scale, dy, odt = adaln_inputs(g, B, T, D, xdt, mdt)
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

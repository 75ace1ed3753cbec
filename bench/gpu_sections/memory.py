"""Section ``memory``: projection_cosine_loss peak memory, fused against eager."""
import torch

from .common import RESULTS
from .device import CUDA, DEV, load_bench, op_sizes

def run(ctx):
    """CUDA: peak memory above the inputs, fused vs eager.  Dry run: the same calls, no numbers.
    Both: the fused loss must equal the eager one (2e-2 relative)."""
    bo = load_bench()
    sz = op_sizes()
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

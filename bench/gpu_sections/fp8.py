"""Section ``fp8``: ``--precision fp8`` (torchao float8 linears, compiled) against bf16 on the SiT-XL/2
full ERW step: img/s and MFU (against the bf16 peak) of both, and the loss of both over the same 20
steps from the same weights. Dry run: the small digits config, emulated float8, eager, 3 steps."""
import torch

from .common import RESULTS
from .device import CUDA, DEV

CUDA_PLAN = dict(size="SiT-XL/2", steps=20, batch=32, compile=True)
DRY_PLAN = dict(size="small", steps=3, batch=8, compile=False, warm=1)


def run(ctx):
    from step_bench import FP8_LOSS_RTOL, fp8_comparison, fp8_skip_reason

    why = fp8_skip_reason(DEV)
    RESULTS["fp8"] = {"plan": CUDA_PLAN if CUDA else DRY_PLAN}
    if why:
        RESULTS["fp8"]["not_run"] = why
        print(f"   fp8: not run: {why}", flush=True)
        ctx.not_run(f"fp8 vs bf16 ({why})")
        return
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    try:
        res = fp8_comparison(device=DEV, stop=lambda name: ctx.over(f"{name} steps"), **(CUDA_PLAN if CUDA else DRY_PLAN))
    finally:
        torch.set_num_threads(threads)
    RESULTS["fp8"].update(res)
    if res["agree"] is None:  # its share ran out before both precisions ran (recorded by ctx.over)
        return
    for name in ("bf16", "fp8"):
        r = res[name]
        mfu = f", MFU {100 * r['mfu']:.1f}% of bf16 peak" if r["mfu"] is not None else ""
        print(f"   {res['size']} full ERW step {name}: {r['img_per_s']:.1f} img/s{mfu}; mean loss over "
              f"{res['steps']} steps {sum(r['losses']) / len(r['losses']):.4f}", flush=True)
    print(f"   fp8/bf16 speed {res['speedup']:.2f}x, mean loss rel diff {res['mean_loss_rel_diff']:.2%}", flush=True)
    if not res["agree"]:
        ctx.fail(f"fp8 mean loss differs from bf16 by {res['mean_loss_rel_diff']:.2%} (> {FP8_LOSS_RTOL:.0%}) "
                 "or is not finite")

"""Section ``compile_fused``: torch.compile(fullgraph) of the custom ops under bf16 autocast
matches eager, and the Triton kernels ran."""
import torch

from .common import RESULTS
from .device import CUDA, DEV, K, ops, rel

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


def run(ctx):
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

"""A CUDA-shaped training step in CI: one ERW warmup step and one full step of SiT-XL/2 (batch 2)
through the real ``Trainer.train_step``, with the choices the trainer makes on a GPU.

How: **fake tensors on the CPU device, with the device decisions forced.** FakeTensors carry shapes
and dtypes but no data, so SiT-XL/2 costs no memory and no arithmetic. (FakeTensors on a CUDA device
can be built on this CPU build, but the patch embedding's convolution then aborts in the CPU build's
device guard, so the device is CPU.) Forced to what a GPU run chooses: the fused custom ops
(``fused=True``, the ops' "auto" backend, Triton on CUDA tensors), the fused alignment loss, fused
AdamW (``make_optimizer`` for a CUDA device), the "auto" attention backend, and bf16 autocast with
CUDA's op policy emulated (``tests/cuda_emulation.py``: layer_norm/softmax in fp32, matmuls in bf16).
Asserted: the step runs; the fused ops are the ones dispatched; attention gets one dtype; the FLOP
count equals the analytic count within 2%.
"""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_emulation import CudaAutocastPolicy  # noqa: E402

import erw_fast.models.sit as sit_mod  # noqa: E402
from erw_fast.engine import Trainer  # noqa: E402
from erw_fast.engine.batches import Batch  # noqa: E402
from erw_fast.engine.trainer import make_optimizer  # noqa: E402
from erw_fast.method import AlignmentSchedule, Objective  # noqa: E402
from erw_fast.models import build_model  # noqa: E402
from erw_fast.utils.flops import count_flops  # noqa: E402

XL = dict(D=1152, depth=28, heads=16, T=256, patch=2, C=4, proj=2048, Z=768, L=4, align_at=14)
B = 2


def analytic_flops(warm: bool) -> float:
    """Forward + backward matmul FLOPs of one SiT-XL/2 step (the target features are precomputed)."""
    D, T, Z, P = XL["D"], XL["T"], XL["Z"], XL["proj"]
    blocks = XL["L"] if warm else XL["depth"]
    dense = blocks * (24 * T * D * D + 12 * D * D)           # qkv, proj, MLP per token; adaLN per sample
    attn = blocks * 4 * T * T * D                            # QK^T and AV
    projector = 2 * T * (D * P + P * P + P * Z)
    embed = 2 * T * (XL["C"] * XL["patch"] ** 2) * D + 2 * 256 * D + 2 * D * D   # patches; t-embedder
    final = 0 if warm else 2 * T * D * (XL["patch"] ** 2 * XL["C"]) + 2 * D * 2 * D
    # backward: 2x the forward for matmuls (input + weight grads), 2.5x for attention (torch's SDPA
    # formula); the first layers' inputs need no grad (weight grads only, 1x)
    return B * (3 * (dense + projector + final) + 3.5 * attn + 2 * embed)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func._overloadpacket))
        return func(*args, **(kwargs or {}))


def _meta_model(warm: bool):
    with torch.device("meta"):
        return build_model("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, z_dims=[XL["Z"]],
                            projector_dim=XL["proj"], encoder_depth=XL["L"] if warm else XL["align_at"],
                            depth=XL["L"] if warm else XL["depth"], use_rope=True, qk_norm=True, fused=True,
                            attn_backend="auto")


def _xl_trainer(warm: bool, meta_model):
    model = meta_model.to_empty(device="cpu")
    if warm:
        model.final_layer.requires_grad_(False)
    objective = Objective(model, XL["L"] if warm else None, True, AlignmentSchedule("halflife", 6.0, 50_000),
                          "cosine", 0.1, fused_align="auto")
    trainer = Trainer(model, objective, [None], lr=1e-4, ema_decay=0.9999, grad_clip=1.0, amp=False, device="cpu")
    trainer.opt = make_optimizer(model, 1e-4, torch.device("cuda"))  # the CUDA choice: fused AdamW
    assert trainer.opt.defaults["fused"] is True
    return trainer


def _batch(warm: bool) -> Batch:
    noise = None if warm else torch.randn(B, 4, 32, 32)
    t = torch.zeros(B) if warm else torch.rand(B)
    return Batch(torch.randn(B, 4, 32, 32), torch.randint(0, 1000, (B,)), noise, t, torch.zeros(B, dtype=torch.bool),
                 None, [torch.randn(B, XL["T"], XL["Z"], dtype=torch.float16)])  # precomputed DINOv2-B features


@pytest.mark.parametrize("warm", [True, False], ids=["warmup-step", "full-step"])
def test_sit_xl2_step_as_a_gpu_runs_it(warm, monkeypatch):
    attn_dtypes = []
    real = sit_mod.attention

    def spy(q, k, v, *a, **kw):
        attn_dtypes.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(sit_mod, "attention", spy)
    meta = _meta_model(warm)  # built outside the fake mode, then given fake storage inside it
    with FakeTensorMode(allow_non_fake_inputs=True):
        trainer = _xl_trainer(warm, meta)
        batch = _batch(warm)
        with CudaAutocastPolicy():
            flops = count_flops(lambda: trainer.loss(batch, 10_000, runner=trainer.objective)[0].backward())
        for p in trainer.params:
            p.grad = None
        log = OpLog()
        with CudaAutocastPolicy() as policy, log:
            out = trainer.train_step(batch, 10_000)
    assert out.loss.shape == () and out.grad_norm.shape == ()
    fused_ops = {"erw_fast.layernorm_modulate", "erw_fast.gated_residual", "erw_fast.projection_cosine_loss"}
    assert fused_ops <= log.names, sorted(n for n in log.names if "erw_fast" in n)
    assert any(n == "layer_norm" for n, _ in policy.seen)  # the QK-norm LayerNorms ran (in fp32, as on CUDA)
    assert attn_dtypes and all(q == k == v == torch.bfloat16 for q, k, v in attn_dtypes), set(attn_dtypes)
    expect = analytic_flops(warm)
    assert abs(flops - expect) / expect < 0.02, (flops, expect)

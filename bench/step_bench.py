#!/usr/bin/env python
"""Training-step benchmarks: naive (``bench/naive_baseline.py``) vs ours, per step kind.

    python bench/step_bench.py OUTDIR                  # CUDA: SiT-XL/2 then SiT-B/2, bf16 (--budget-s 150)
    python bench/step_bench.py OUTDIR --device cpu     # the small CPU config (digits SiT-D/2)

or, from the GPU check script::

    from step_bench import run_step_benchmarks
    run_step_benchmarks(outdir, device="cuda", sizes=("SiT-XL/2", "SiT-B/2"), budget_s=150)

``budget_s`` is a soft limit: nothing new starts after it, a size only starts with >= 75 s left (its
first step compiles the block), and the timed rounds shrink to fit; the part running when it
expires finishes (tens of seconds at most on an H100).

"ours" is the training engine's own step, ``erw_fast.engine.Trainer.train_step`` — what
``python -m erw_fast.train`` runs every step: the method's ``Objective`` (fused projection+cosine
alignment loss on CUDA), the SiT with fused LayerNorm+modulate / gated residual (on CUDA, Triton),
every SiT block compiled with ``fullgraph=True`` (``Trainer.wrap(compile=True)``, what ``train
--compile`` does), fused AdamW on CUDA (foreach on CPU), ``clip_grad_norm_(foreach=True)``, the EMA
(``torch._foreach_lerp_``), the on-device NaN bookkeeping, and the target encoder under bf16
autocast on CUDA (``TargetEncoder.reduced_precision``).  Both sides start from identical weights, read the same batches,
use the same model (RoPE as the engine default, SDPA attention), bf16 autocast on CUDA and fp32 on CPU.

Measurement: for each step kind both sides are built and warmed up (compile excluded), then timed
**interleaved** (naive, ours, ours, naive, ...) so that a noisy, shared machine slows both alike;
the ratio is median(naive step s) / median(ours step s) from the same run.  On CUDA also: peak
memory of one step above the resident state (weights, optimizer, EMA), FLOPs per step with
``FlopCounterMode`` (the naive eager step: forward, backward and the target encoder), MFU against the
H100 SXM datasheet dense bf16 rate (989 TFLOP/s) and against a measured 8192^3 bf16 matmul rate.

CUDA sizes: 256-px ImageNet shapes (latents 32x32x4, SiT-*/2: 256 tokens), 1000 classes, projector
2048 -> 768, the target encoder a **DINOv2-B/14 stand-in**: a ViT-B/14 with DINOv2-B's shapes
(12 blocks, width 768, 12 heads, MLP 3072, 224-px input = 16x16 patches + CLS, random weights,
REPA's preprocessing: /255, ImageNet mean/std, bicubic resize), wrapped in the project's
``DINOv2Encoder``.  It has DINOv2-B's cost; its weights are random because nothing can be
downloaded on the GPU machine (the features' values do not change the step's cost).
CPU size ("small"): the digits default (``SiT-D/2``: 4 blocks, hidden 96, 16x16x1 pixels, 64 tokens,
projector 256 -> 64, the embedded ``digits-cnn`` encoder), batch 64, fp32, one intra-op thread.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from naive_baseline import KINDS, NaiveStep, TrainStep, naive_optimizer  # noqa: E402

H100_BF16_DENSE = 989e12  # H100 SXM datasheet, dense bf16 FLOP/s

# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
SIZES = {
    # CPU: the digits default model (erw_fast.engine.config DATA_DEFAULTS / MODEL_DEFAULTS["D"])
    "small": dict(model="SiT-D/2", data="digits", input_size=16, in_channels=1, num_classes=10,
                  projector_dim=256, l2r_depth=2, encoder_depth=2, lambda0=1.0, batch=64,
                  encoder="digits-cnn", lr=1e-3, ema_decay=0.99),
    # CUDA: 256-px ImageNet latents; depths/λ0 as erw_fast.engine.config.MODEL_DEFAULTS
    "SiT-B/2": dict(model="SiT-B/2", data="latents", input_size=32, in_channels=4, num_classes=1000,
                    projector_dim=2048, l2r_depth=4, encoder_depth=4, lambda0=1.0, batch=256,
                    encoder="dinov2-b-standin", lr=1e-4, ema_decay=0.9999),
    "SiT-XL/2": dict(model="SiT-XL/2", data="latents", input_size=32, in_channels=4, num_classes=1000,
                     projector_dim=2048, l2r_depth=4, encoder_depth=14, lambda0=6.0, batch=64,
                     encoder="dinov2-b-standin", lr=1e-4, ema_decay=0.9999),
}
REPORT = {}  # (size, kind) -> row; filled by bench/bench_train_step.py, printed by bench/_step_report.py
HALF_LIFE = 50_000
SCHEDULE_STEP = 10_000  # the phase-2 step at which λ is evaluated (any: it is one float)


def step_lambda(kind: str, cfg: dict) -> float:
    from erw_fast.erw import AlignmentSchedule

    if kind == "full":
        return AlignmentSchedule("halflife", cfg["lambda0"], HALF_LIFE)(SCHEDULE_STEP)
    if kind == "repa":
        return AlignmentSchedule("constant", cfg["lambda0"])(SCHEDULE_STEP)
    return 0.0


# --------------------------------------------------------------------------------------------
# The DINOv2-B/14 stand-in (same shapes and cost as DINOv2 ViT-B/14 at 224 px; random weights)
# --------------------------------------------------------------------------------------------
class _ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.full((dim,), 1e-5))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.ls2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.ls1 * self.proj(a)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTB14StandIn(nn.Module):
    """DINOv2 ViT-B/14 shapes: patch 14, width 768, 12 blocks, 12 heads; ``forward_features`` like
    the torch.hub DINOv2 (``x_norm_patchtokens``)."""

    def __init__(self, dim=768, depth=12, heads=12, patch=14, grid=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:]}


def build_target_encoder(name: str, device, input_size: int):
    if name == "dinov2-b-standin":
        from erw_fast.encoders.dinov2 import DINOv2Encoder

        with torch.device(device):
            vit = ViTB14StandIn()
        enc = DINOv2Encoder(vit, kind="hub", patch_size=14, dim=768, token_grid=16, name=name)
        return enc.freeze().to(device)
    from erw_fast.encoders import build_encoder

    return build_encoder(name, device=device, input_size=input_size)


# --------------------------------------------------------------------------------------------
# Our step (the engine's pieces)
# --------------------------------------------------------------------------------------------
def fused_align_setting(device) -> object:
    """As the engine decides it with --fused unset (``erw_fast.ops.resolve_fused``)."""
    from erw_fast import ops

    return ops.resolve_fused(None, torch.device(device))


def engine_batch(kind: str, batch: dict):
    """A bench batch dict as the engine's ``Batch`` (the warmup reads clean inputs: t = 0, no ε)."""
    from erw_fast.engine.batches import Batch

    t, noise = batch["t"], batch["noise"]
    if kind == "warmup":
        t, noise = torch.zeros_like(t), None
    return Batch(batch["x"], batch["y"], noise, t, batch["drop"], batch["enc"], [None])


def make_objective(kind, model, cfg: dict, warm_blocks, fused_align):
    """The engine's objective for a step kind, with the schedule the trainer would build."""
    from erw_fast.method import AlignmentSchedule, Objective

    sched = {"full": AlignmentSchedule("halflife", cfg["lambda0"], HALF_LIFE),
             "repa": AlignmentSchedule("constant", cfg["lambda0"])}.get(kind)
    return Objective(model, warm_blocks if kind == "warmup" else None, kind != "vanilla", sched, "cosine", 0.1,
                     fused_align)


class OursStep(TrainStep):
    """One step of ``kind`` = ``Trainer.train_step`` of the training engine (``erw_fast.engine``).
    Step kinds that share a model share its Trainer (its AdamW and EMA); each kind has its objective."""

    side = "ours"

    def __init__(self, kind, trainer, cfg: dict, warm_blocks, fused_align=None):
        if kind not in KINDS:
            raise ValueError(f"unknown step kind {kind!r}; choose one of {KINDS}")
        self.kind, self.trainer, self.device = kind, trainer, trainer.device
        self.model, self.opt = trainer.model, trainer.opt
        if fused_align is None:
            fused_align = fused_align_setting(self.device)
        self.objective = make_objective(kind, trainer.model, cfg, warm_blocks, fused_align)
        self.k = SCHEDULE_STEP  # the phase-2 step at which λ is evaluated

    def loss(self, batch):
        self.trainer.use_objective(self.objective)
        return self.trainer.loss(engine_batch(self.kind, batch), self.k)[0]

    def __call__(self, batch):
        self.trainer.use_objective(self.objective)
        return self.trainer.train_step(engine_batch(self.kind, batch), self.k).loss

    # the step's phases, for phase_times (train_step runs exactly these, in this order)
    def targets(self, batch):
        self.trainer.use_objective(self.objective)
        return self.trainer.targets(engine_batch(self.kind, batch), self.k)

    def clip(self):
        self.trainer.clip_gradients()

    def ema_update(self):
        self.trainer.update_ema()


# --------------------------------------------------------------------------------------------
# Building a comparison: identical weights on both sides
# --------------------------------------------------------------------------------------------
def build_model_pair(cfg: dict, warm: bool, device, z_dim: int, seed: int = 0):
    """(naive model, ours model): the same weights; the warmup model has L blocks and a frozen final
    layer (as the engine builds it)."""
    from erw_fast.models.sit import build_model

    kw = dict(input_size=cfg["input_size"], in_channels=cfg["in_channels"], num_classes=cfg["num_classes"],
              class_dropout_prob=0.1, encoder_depth=cfg["encoder_depth"], z_dims=[z_dim],
              projector_dim=cfg["projector_dim"], use_rope=True, qk_norm=False, attn_backend="sdpa",
              fused=False)
    if warm:
        kw.update(depth=cfg["l2r_depth"], encoder_depth=cfg["l2r_depth"])
    torch.manual_seed(seed)
    with torch.device(device):
        naive = build_model(cfg["model"], **kw)
    if warm:
        naive.final_layer.requires_grad_(False)
    ours = copy.deepcopy(naive)
    ours.set_fused(None)  # the engine default: fused Triton ops on CUDA, plain PyTorch on CPU
    return naive, ours


class Pair:
    """Both sides' models, EMA copies and optimizers for one model (warmup or full); step
    callables per kind share them (full / repa / vanilla use the same full model). Our side is one
    ``erw_fast.engine.Trainer`` (it owns our model's AdamW and EMA)."""

    def __init__(self, cfg, warm, device, encoder, compile=True, ours_fused=None, ours_fused_align=None,
                 seed=0):
        from erw_fast.engine import Trainer

        self.cfg, self.warm, self.device, self.encoder = cfg, warm, torch.device(device), encoder
        naive_model, ours_model = build_model_pair(cfg, warm, self.device, encoder.dim, seed)
        if ours_fused is not None:
            ours_model.set_fused(ours_fused)
        self.naive_model = naive_model
        self.naive_ema = copy.deepcopy(self.naive_model).requires_grad_(False)
        self.naive_opt = naive_optimizer(self.naive_model, cfg["lr"])
        self.ours_fused_align = ours_fused_align
        first = make_objective("warmup" if warm else "full", ours_model, cfg, cfg["l2r_depth"],
                               ours_fused_align if ours_fused_align is not None else fused_align_setting(self.device))
        amp = self.device.type == "cuda"
        self.trainer = Trainer(ours_model, first, [encoder], lr=cfg["lr"], ema_decay=cfg["ema_decay"],
                               grad_clip=1.0, amp=amp, device=self.device)
        self.trainer.wrap(compile=compile)  # what --compile does
        self.ours_model, self.ours_ema = self.trainer.model, self.trainer.ema_model

    def steps(self, kind):
        if (kind == "warmup") != self.warm:
            raise ValueError(f"step kind {kind!r} needs the {'warmup' if kind == 'warmup' else 'full'} model")
        c = self.cfg
        lam = step_lambda(kind, c)
        L = c["l2r_depth"] if kind == "warmup" else None
        naive = NaiveStep(kind, self.naive_model, self.naive_ema, self.encoder, lam, L, opt=self.naive_opt,
                          lr=c["lr"], ema_decay=c["ema_decay"])
        ours = OursStep(kind, self.trainer, c, c["l2r_depth"], fused_align=self.ours_fused_align)
        return naive, ours


def make_batches(cfg: dict, device, batch: int = None, n: int = 2, seed: int = 1):
    """``n`` batches on ``device``: x, y, noise, t, drop, enc (what the encoder reads)."""
    B = batch or cfg["batch"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if cfg["data"] == "digits":
            from erw_fast.data.digits import load_digits

            images, labels = load_digits(cfg["input_size"])
            idx = torch.randint(0, len(labels), (B,), generator=g)
            x, y = images[idx], labels[idx]
            enc = x
        else:
            x = torch.randn(B, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g) * 0.8
            y = torch.randint(0, cfg["num_classes"], (B,), generator=g)
            enc = torch.randint(0, 256, (B, 3, 8 * cfg["input_size"], 8 * cfg["input_size"]), generator=g,
                                dtype=torch.uint8)  # the raw 256-px image
        b = dict(x=x, y=y, noise=torch.randn(x.shape, generator=g), t=torch.rand(B, generator=g),
                 drop=torch.rand(B, generator=g) < 0.1, enc=enc)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(step, batch, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(batch)
    sync(device)
    return time.perf_counter() - t0


def warm_up(step, batches, device, n):
    """``n`` untimed steps (the first ones compile); automatic dynamic shapes off so that a second
    model size compiles static kernels instead of a dynamic-shape graph."""
    import torch._dynamo

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for i in range(n):
            step(batches[i % len(batches)])
    sync(device)


def interleaved(naive, ours, batches, device, rounds):
    """Alternate the sides (naive, ours / ours, naive, ...); -> (naive times, ours times) in s."""
    tn, to = [], []
    for r in range(rounds):
        b = batches[r % len(batches)]
        order = ((naive, tn), (ours, to)) if r % 2 == 0 else ((ours, to), (naive, tn))
        for fn, acc in order:
            acc.append(timed(fn, b, device))
    return tn, to


def step_peak_mem(step, batch, device):
    """CUDA: peak bytes of one step above what was allocated before it (activations, grads,
    temporaries); None on CPU (no allocator statistics for CPU tensors)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step_flops(naive_step, batch) -> float:
    """FLOPs of one step (forward + backward + target encoder) by FlopCounterMode, on the naive eager
    step (the same maths as ours; optimizer/EMA have no matmuls)."""
    from erw_fast.utils.flops import count_flops

    def one():
        naive_step.loss(batch).backward()

    try:
        return count_flops(one)
    finally:
        naive_step.opt.zero_grad(set_to_none=True)


def phase_times(step, batch, device, rounds=5):
    """Median seconds of each phase of a step: target encoder, forward (model + losses), backward,
    grad clip, optimizer, EMA -- the same phases as ``step(batch)``, run one after the other."""
    names = ("encoder", "forward", "backward", "clip", "optimizer", "ema")
    acc = {k: [] for k in names}
    for _ in range(rounds):
        sync(device)
        t = [time.perf_counter()]
        if step.kind != "vanilla":
            step.targets(batch)
        sync(device)
        t.append(time.perf_counter())
        loss = step.loss(batch)  # includes the encoder again: subtracted below
        sync(device)
        t.append(time.perf_counter())
        step.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t.append(time.perf_counter())
        step.clip()
        sync(device)
        t.append(time.perf_counter())
        step.opt.step()
        sync(device)
        t.append(time.perf_counter())
        step.ema_update()
        sync(device)
        t.append(time.perf_counter())
        d = [b - a for a, b in zip(t, t[1:])]
        d[1] -= d[0]
        for k, v in zip(names, d):
            acc[k].append(v)
    return {k: statistics.median(v) for k, v in acc.items()}


def measure_bf16_matmul(n=8192, reps=20):
    """Measured dense bf16 matmul rate (FLOP/s) of an n^3 product on this GPU."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (e0.elapsed_time(e1) / 1e3)


def summarise(size, kind, batch, tn, to, flops=None, mem_naive=None, mem_ours=None, matmul_rate=None,
              device="cpu"):
    mn, mo = statistics.median(tn), statistics.median(to)
    row = dict(size=size, kind=kind, batch=batch, device=str(device), rounds=len(tn),
               naive_s=mn, ours_s=mo, naive_img_s=batch / mn, ours_img_s=batch / mo, ratio=mn / mo,
               pair_ratio_median=statistics.median(a / b for a, b in zip(tn, to)),
               naive_times=tn, ours_times=to,
               naive_peak_mem_gib=None if mem_naive is None else mem_naive / 2 ** 30,
               ours_peak_mem_gib=None if mem_ours is None else mem_ours / 2 ** 30,
               flops_per_step=flops)
    if flops and torch.device(device).type == "cuda":
        row.update(naive_mfu=flops / mn / H100_BF16_DENSE, ours_mfu=flops / mo / H100_BF16_DENSE,
                   ours_tflops=flops / mo / 1e12, naive_tflops=flops / mn / 1e12)
        if matmul_rate:
            row.update(ours_frac_of_matmul=flops / mo / matmul_rate, naive_frac_of_matmul=flops / mn / matmul_rate)
    return row


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def markdown_table(rows, meta=None) -> str:
    cuda = any(r.get("naive_mfu") is not None for r in rows)
    head = "| size | step | batch | naive img/s | ours img/s | ours/naive | pair-ratio median | rounds |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    if cuda:
        head += " naive MFU | ours MFU | ours % of measured matmul | naive peak GiB | ours peak GiB |"
        sep += "---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']} | {r['kind']} | | | | skipped: {r['skipped']} | | |" + (" | | | | |" if cuda else ""))
            continue
        line = (f"| {r['size']} | {r['kind']} | {r['batch']} | {r['naive_img_s']:.1f} | {r['ours_img_s']:.1f} | "
                f"**{r['ratio']:.2f}x** | {r['pair_ratio_median']:.2f}x | {r['rounds']} |")
        if cuda:
            line += (f" {_f(r.get('naive_mfu') and 100 * r['naive_mfu'], '.1f')}% | "
                     f"{_f(r.get('ours_mfu') and 100 * r['ours_mfu'], '.1f')}% | "
                     f"{_f(r.get('ours_frac_of_matmul') and 100 * r['ours_frac_of_matmul'], '.1f')}% | "
                     f"{_f(r.get('naive_peak_mem_gib'), '.2f')} | {_f(r.get('ours_peak_mem_gib'), '.2f')} |")
        lines.append(line)
    out = "\n".join(lines) + "\n"
    for r in rows:
        if r.get("note"):
            out += f"\nNote ({r['size']} {r['kind']}): {r['note']}\n"
    ph = [r for r in rows if r.get("naive_phases") and r.get("ours_phases")]
    if ph:
        names = list(ph[0]["naive_phases"])
        out += ("\nWhere a step's time goes (ms, median of a few steps run phase by phase):\n\n"
                "| size | step | side | " + " | ".join(names) + " | sum |\n|---|---|---|" + "---:|" * (len(names) + 1) + "\n")
        for r in ph:
            for side in ("naive", "ours"):
                p = r[f"{side}_phases"]
                out += (f"| {r['size']} | {r['kind']} | {side} | " + " | ".join(f"{1e3 * p[k]:.1f}" for k in names)
                        + f" | {1e3 * sum(p.values()):.1f} |\n")
    checks = headline_checks(rows)
    if checks:
        out += "\n" + "\n".join(f"- {c}" for c in checks) + "\n"
    return out


def headline_checks(rows):
    """The issue's targets, evaluated on the rows at hand."""
    by = {(r["size"], r["kind"]): r for r in rows if not r.get("skipped")}
    out = []
    for size in sorted({r["size"] for r in rows}):
        full, warm = by.get((size, "full")), by.get((size, "warmup"))
        if full and full.get("ours_mfu") is not None:
            out.append(f"{size} full ERW step: ours MFU {100 * full['ours_mfu']:.1f}% of 989 TFLOP/s "
                       f"(target >= 50%: {'met' if full['ours_mfu'] >= 0.5 else 'NOT met'})")
        if full:
            tgt = 1.5 if full.get("ours_mfu") is not None else 1.3
            out.append(f"{size} full ERW step: ours/naive {full['ratio']:.2f}x (target >= {tgt}x: "
                       f"{'met' if full['ratio'] >= tgt else 'NOT met'})")
        if full and warm:
            r = warm["ours_img_s"] / full["ours_img_s"]
            tgt = f"target >= 4x: {'met' if r >= 4 else 'NOT met'}" if size == "SiT-XL/2" else \
                "the >= 4x target is for SiT-XL/2, 4 of 28 blocks"
            out.append(f"{size} ours warmup img/s / full img/s = {r:.2f}x ({tgt})")
    return out


def environment(device) -> dict:
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                device=str(device), threads=torch.get_num_threads())
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except Exception:
        meta["commit"] = None
    if torch.device(device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    else:
        meta["cpu_count"] = os.cpu_count()
        try:
            meta["loadavg"] = os.getloadavg()
        except OSError:
            pass
    return meta


def write_results(outdir, rows, meta, stem="step_results"):
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    with open(os.path.join(outdir, f"{stem}.md"), "w") as f:
        f.write("## Training steps: naive vs ours\n\n")
        f.write("Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("errors",)) + "\n\n")
        f.write(markdown_table(rows))
        for e in meta.get("errors", []):
            f.write(f"\n- error ({e.get('where')}): {e.get('error')}\n")


# --------------------------------------------------------------------------------------------
# --precision fp8 (torchao float8 linears) against bf16: the full ERW step, same weights and batches
# --------------------------------------------------------------------------------------------
FP8_LOSS_RTOL = 0.05  # mean loss of the same steps, fp8 vs bf16 (measured on CPU: see docs/training.md)


def fp8_skip_reason(device) -> "str | None":
    """Why the fp8 step cannot be measured here (None when it can): a CUDA card of compute capability
    >= 8.9 (or the CPU, emulated) and torchao are needed."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return (f"--precision fp8 needs a CUDA card of compute capability >= 8.9 (Ada/Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:
        from erw_fast.engine.fp8 import TORCHAO_HINT

        return f"torchao does not import ({type(e).__name__}): {TORCHAO_HINT}"
    return None


def fp8_trainer(cfg, device, encoder, batch, recipe, compile, seed=0):
    """(Trainer of the full ERW step, FLOPs of its step): ``recipe`` None = bf16 autocast, else
    ``--precision fp8`` with that recipe; FLOPs counted on the eager bf16 model (the engine's rule)."""
    from erw_fast.engine import Trainer

    _, model = build_model_pair(cfg, False, device, encoder.dim, seed)
    objective = make_objective("full", model, cfg, cfg["l2r_depth"], fused_align_setting(device))
    trainer = Trainer(model, objective, [encoder], lr=cfg["lr"], ema_decay=cfg["ema_decay"], grad_clip=1.0,
                      amp=True, device=device, fp8=recipe)
    flops = trainer.count_step_flops(engine_batch("full", batch), SCHEDULE_STEP)
    return trainer.wrap(compile=compile), flops


def _fp8_run(cfg, device, encoder, batches, recipe, compile, seed=0):
    """Per-step losses and seconds of ``len(batches)`` full ERW steps from the same initial weights."""
    trainer, flops = fp8_trainer(cfg, device, encoder, batches[0], recipe, compile, seed)
    losses, secs = [], []
    for b in batches:
        t0 = time.perf_counter()
        out = trainer.train_step(engine_batch("full", b), SCHEDULE_STEP)
        sync(device)
        secs.append(time.perf_counter() - t0)
        losses.append(out.loss)
    return [float(v) for v in losses], secs, flops


def fp8_comparison(size, device, steps=20, batch=None, recipe="tensorwise", compile=True, warm=3, stop=None):
    """bf16 vs fp8 full ERW steps of ``size`` on the same ``steps`` batches: img/s (median of the
    steps after the first ``warm``, which compile), MFU against the bf16 peak (CUDA), every step's
    loss, and whether the mean losses agree within ``FP8_LOSS_RTOL``. ``stop(name)``, asked before
    each precision runs, may return True to leave it out (a time budget): then ``agree`` is None."""
    cfg = dict(SIZES[size])
    device = torch.device(device)
    B = batch or cfg["batch"]
    encoder = build_target_encoder(cfg["encoder"], device, cfg["input_size"])
    batches = make_batches(cfg, device, B, n=steps)
    out = dict(size=size, batch=B, steps=steps, recipe=recipe, compile=compile, device=str(device))
    for name, rec in (("bf16", None), ("fp8", recipe)):
        if stop is not None and stop(name):
            out["agree"] = None
            return out
        losses, secs, flops = _fp8_run(cfg, device, encoder, batches, rec, compile)
        med = statistics.median(secs[warm:] if len(secs) > warm else secs)
        out[name] = dict(losses=losses, first_step_s=secs[0], median_step_s=med, img_per_s=B / med,
                         flops_per_step=flops,
                         mfu=flops / med / H100_BF16_DENSE if (device.type == "cuda" and flops) else None)
        _free()
    a, b = statistics.fmean(out["bf16"]["losses"]), statistics.fmean(out["fp8"]["losses"])
    out["mean_loss_rel_diff"] = abs(b - a) / max(abs(a), 1e-12)
    out["speedup"] = out["fp8"]["img_per_s"] / out["bf16"]["img_per_s"]
    finite = all(math.isfinite(v) for v in out["bf16"]["losses"] + out["fp8"]["losses"])
    out["agree"] = finite and out["mean_loss_rel_diff"] <= FP8_LOSS_RTOL
    return out


# --------------------------------------------------------------------------------------------
# The GPU-check entry point
# --------------------------------------------------------------------------------------------
def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_step_benchmarks(outdir, device="cuda", sizes=("SiT-XL/2", "SiT-B/2"), budget_s=150.0,
                        kinds=KINDS, batch=None, rounds=8, compile=True, stem="step_results",
                        ours_fused=None, compile_margin_s=None):
    """Time naive vs ours for every step kind and size; write ``OUTDIR/<stem>.json`` and
    ``OUTDIR/<stem>.md``; return ``{"meta", "rows"}``.

    Per size: the full model pair runs ``full`` first, then the warmup pair ``warmup``, then the
    full pair ``repa`` and ``vanilla`` (the order of importance: the headline ``full`` and the
    warmup/full ratio come first).  Parts that would start after ``budget_s`` are recorded as skipped.
    Each kind: warm-up (ours 3 steps: compile; naive 2), peak memory of one step per side, FLOPs,
    then ``rounds`` interleaved timed steps per side.  On CUDA TF32 is allowed (as REPA and the
    engine do) and an out-of-memory batch is halved once.  A size is only started when at least
    ``compile_margin_s`` (default 75 s on CUDA, 20 s on CPU: its first step compiles the block) of
    the budget is left.  ``ours_fused``: override our model's fused-op setting (e.g. False to time
    ours without the Triton ops); None = the engine default.
    """
    t_start = time.time()
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = environment(device)
    if compile_margin_s is None:
        compile_margin_s = 75.0 if cuda else 20.0
    meta.update(budget_s=budget_s, compile=compile, errors=[], ours_fused=str(ours_fused),
                encoder="DINOv2-B/14 stand-in (random-weight ViT-B/14, 224 px, 257 tokens)" if cuda else "digits-cnn")
    rows = []
    if cuda:
        try:
            meta["bf16_matmul_tflops"] = measure_bf16_matmul() / 1e12
        except Exception as e:  # pragma: no cover
            meta["errors"].append(dict(where="matmul", error=repr(e)))

    def left():
        return budget_s - (time.time() - t_start)

    order = [("full", ("full",)), ("warm", ("warmup",)), ("full", ("repa", "vanilla"))]
    for size in sizes:
        cfg = dict(SIZES[size])
        if batch:
            cfg["batch"] = batch
        enc = None
        pairs = {}
        if left() < compile_margin_s:
            rows.extend(dict(size=size, kind=k, skipped=f"time budget ({budget_s:.0f} s): no time left to compile")
                        for k in kinds)
            continue
        fused = ours_fused
        try:
            enc = build_target_encoder(cfg["encoder"], device, cfg["input_size"])
            for group, group_kinds in order:
                for kind in [k for k in group_kinds if k in kinds]:
                    if left() < 10:
                        rows.append(dict(size=size, kind=kind, skipped=f"time budget ({budget_s:.0f} s) spent"))
                        continue
                    row, note = None, None
                    for attempt in range(3):
                        failure = None
                        try:
                            if group not in pairs:
                                pairs[group] = Pair(cfg, group == "warm", device, enc, compile=compile,
                                                    ours_fused=fused)
                            row = _measure_kind(size, kind, cfg, pairs[group], device, rounds, meta, left)
                        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                            failure = ("oom", repr(e)[:300])
                        except Exception as e:
                            failure = ("error", repr(e)[:300])
                            meta["errors"].append(dict(where=f"{size} {kind}", error=repr(e),
                                                       traceback=traceback.format_exc()))
                        if failure is None:
                            break
                        pairs.clear()  # outside the except block: the traceback no longer pins tensors
                        _free()
                        what, msg = failure
                        if what == "oom" and cfg["batch"] > 1 and attempt < 2:
                            cfg["batch"] //= 2
                            meta["errors"].append(dict(where=f"{size} {kind}", error=f"OOM, batch -> {cfg['batch']}"))
                        elif what == "error" and fused is not False and attempt < 2:
                            # keep the comparison going without the fused Triton ops (compile only)
                            fused = False
                            note = f"ours without fused ops (fused path failed: {msg})"
                            meta["errors"].append(dict(where=f"{size} {kind}", error="retrying with ours_fused=False"))
                        else:
                            rows.append(dict(size=size, kind=kind, skipped=f"{what}: {msg}"))
                            break
                    if row is not None:
                        if fused is False and ours_fused is not False:
                            row["note"] = note or "ours without fused ops"
                        row["ours_fused"] = str(fused)
                        rows.append(row)
                    print(f"step_bench: {size} {kind}: " + (
                        f"naive {rows[-1]['naive_img_s']:.1f} img/s, ours {rows[-1]['ours_img_s']:.1f} img/s, "
                        f"{rows[-1]['ratio']:.2f}x" if not rows[-1].get("skipped") else rows[-1]["skipped"])
                        + f"  [{time.time() - t_start:.0f} s]", flush=True)
                    write_results(outdir, rows, meta, stem)
                if group == "warm":
                    pairs.pop("warm", None)
                    _free()
        except Exception as e:
            meta["errors"].append(dict(where=size, error=repr(e), traceback=traceback.format_exc()))
            print(f"step_bench: {size} failed: {e!r}", flush=True)
        pairs.clear()
        enc = None
        _free()
    meta["total_s"] = round(time.time() - t_start, 1)
    write_results(outdir, rows, meta, stem)
    return dict(meta=meta, rows=rows)


def _measure_kind(size, kind, cfg, pair, device, rounds, meta, left):
    naive, ours = pair.steps(kind)
    B = cfg["batch"]
    batches = make_batches(cfg, device, B)
    t0 = time.time()
    warm_up(ours, batches, device, 3)
    warm_up(naive, batches, device, 2)
    meta.setdefault("warmup_s", {})[f"{size} {kind}"] = round(time.time() - t0, 1)
    mem_n = step_peak_mem(naive, batches[0], device)
    mem_o = step_peak_mem(ours, batches[0], device)
    flops = None
    if torch.device(device).type == "cuda":
        flops = step_flops(naive, batches[1])
    # fit the rounds into what is left (each round = one step per side)
    t1 = timed(naive, batches[0], device) + timed(ours, batches[1], device)
    n = max(3, min(rounds, int(max(left() - 5, 0) / max(t1, 1e-6)) // 2))
    tn, to = interleaved(naive, ours, batches, device, n)
    row = summarise(size, kind, B, tn, to, flops, mem_n, mem_o, meta.get("bf16_matmul_tflops", 0) * 1e12 or None,
                    device)
    if kind == "full" and left() > 20:
        row["naive_phases"] = phase_times(naive, batches[0], device, 2)
        row["ours_phases"] = phase_times(ours, batches[0], device, 2)
    return row


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="naive vs ours training-step benchmark")
    p.add_argument("outdir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma-separated (default: SiT-XL/2,SiT-B/2 on CUDA, small on CPU)")
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="ours without the fused Triton ops (compile only)")
    a = p.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(int(os.environ.get("ERW_STEP_THREADS", "1")))
    sizes = a.sizes.split(",") if a.sizes else (("SiT-XL/2", "SiT-B/2") if a.device.startswith("cuda") else ("small",))
    res = run_step_benchmarks(a.outdir, a.device, sizes, a.budget_s, batch=a.batch, rounds=a.rounds,
                              compile=not a.no_compile, ours_fused=False if a.no_fused else None)
    print(markdown_table(res["rows"]))
    return 0 if res["rows"] and not res["meta"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The naive baseline: one training step the way the public REPA/ERW code writes it.

Our own, small and explicit, so the comparison in ``bench/bench_train_step.py`` and
``bench/step_bench.py`` is visible and fair.  What makes it "naive" (and what the public code does):

- eager PyTorch: no ``torch.compile``; the SiT runs with ``fused=False`` (LayerNorm, modulate and
  the gated residual as separate PyTorch ops) and ``attn_backend="sdpa"``;
- bf16 autocast around the model on CUDA (fp32 on CPU);
- the target encoder in fp32 every step (``encoder.encode`` with autocast off);
- the alignment loss materialised: projector output ``zs`` (B, T, C), then ``F.normalize`` of both
  sides and the negative cosine (batched; REPA's per-sample Python loop would be slower still);
- the velocity loss ``mean((v_pred - (eps - x))**2)``;
- ``clip_grad_norm_`` with PyTorch's defaults (REPA's ``accelerator.clip_grad_norm_``);
- ``torch.optim.AdamW(foreach=False, fused=False)`` (one kernel chain per parameter);
- the EMA as a Python loop over named parameters, ``ema.mul_(d).add_(p, alpha=1 - d)`` (REPA's
  ``update_ema``).

Step kinds (``kind``):
  ``warmup``  ERW phase 1: blocks 0..L-1 + projector on clean inputs (t = 0), alignment loss only
              (the model passed in is the L-block warmup model, as the engine builds it);
  ``full``    ERW phase 2: velocity MSE + λ·alignment (λ from ERW's half-life schedule);
  ``repa``    the same computation with REPA's constant λ;
  ``vanilla`` SiT: velocity MSE only (no encoder, no projector).

A batch is a dict: ``x`` (model input: latents or pixels), ``y`` labels, ``noise``, ``t``, ``drop``
(label-drop mask) and ``enc`` (what the target encoder reads: raw images, or ``x`` for the digits).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

KINDS = ("warmup", "full", "repa", "vanilla")


def naive_alignment_loss(zs, zs_target):
    """REPA's projection loss, materialised: mean over tokens and samples of -cos(z, z~)."""
    total = 0.0
    for z, zt in zip(zs, zs_target):
        z = F.normalize(z.float(), dim=-1)
        zt = F.normalize(zt.float(), dim=-1)
        total = total + (-(z * zt).sum(dim=-1)).mean()
    return total / len(zs)


def naive_velocity_loss(pred, x, noise):
    target = noise - x
    return ((pred.float() - target.float()) ** 2).mean()


@torch.no_grad()
def naive_update_ema(ema_model, model, decay):
    """REPA's update_ema: a Python loop over named parameters."""
    ema_params = OrderedDict(ema_model.named_parameters())
    model_params = OrderedDict(model.named_parameters())
    for name, param in model_params.items():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def naive_optimizer(model, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, foreach=False, fused=False)


class TrainStep:
    """The step both sides share: forward, backward, clip, optimizer, EMA (subclasses give the parts)."""

    def __call__(self, batch):
        loss = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clip()
        self.opt.step()
        self.ema_update()
        return loss.detach()


class NaiveStep(TrainStep):
    """One naive training step of ``kind`` on ``model`` (see the module doc).

    ``model``/``ema_model`` are SiTs (the L-block warmup model for ``kind="warmup"``), ``encoder`` a
    ``TargetEncoder`` (its fp32 ``encode`` is called), ``lam`` the alignment weight, ``warm_blocks``
    L.  ``loss(batch)`` is the forward (returns the loss with its graph); ``__call__(batch)`` is the
    whole step: encoder, forward, backward, clip, AdamW, EMA.
    """

    side = "naive"

    def __init__(self, kind, model, ema_model, encoder, lam, warm_blocks, lr=1e-4, ema_decay=0.9999,
                 grad_clip=1.0, amp=None, opt=None):
        if kind not in KINDS:
            raise ValueError(f"unknown step kind {kind!r}; choose one of {KINDS}")
        self.kind, self.model, self.ema_model, self.encoder = kind, model, ema_model, encoder
        self.lam, self.warm_blocks = float(lam), warm_blocks
        self.ema_decay, self.grad_clip = ema_decay, grad_clip
        self.device = next(model.parameters()).device
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.model.set_fused(False)
        for p in ema_model.parameters():
            p.requires_grad_(False)
        self.opt = naive_optimizer(model, lr) if opt is None else opt  # step kinds may share one

    def targets(self, batch):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return [self.encoder.encode(batch["enc"]).float()]

    def loss(self, batch):
        m, kind = self.model, self.kind
        x, y, drop = batch["x"], batch["y"], batch["drop"]
        targets = self.targets(batch) if kind != "vanilla" else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if kind == "warmup":
                t0 = torch.zeros_like(batch["t"])
                zs = m.forward_warmup(x, t0, y, self.warm_blocks, force_drop_ids=drop)
                return naive_alignment_loss(zs, targets)
            t, noise = batch["t"], batch["noise"]
            te = t.view(-1, *([1] * (x.dim() - 1)))
            xt = (1 - te) * x + te * noise
            if kind == "vanilla":
                out, _ = m(xt, t, y, force_drop_ids=drop, return_hidden=True)  # no projector run
                return naive_velocity_loss(out, x, noise)
            out, zs = m(xt, t, y, force_drop_ids=drop)
            return naive_velocity_loss(out, x, noise) + self.lam * naive_alignment_loss(zs, targets)

    def clip(self):
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def ema_update(self):
        naive_update_ema(self.ema_model, self.model, self.ema_decay)



def naive_step_fn(kind, model, ema_model, encoder, lam, warm_blocks, **kw):
    """Functional spelling: the step callable for ``kind`` (``warmup`` / ``full`` / ``repa`` / ``vanilla``)."""
    return NaiveStep(kind, model, ema_model, encoder, lam, warm_blocks, **kw)


def warmup_step(model, ema_model, encoder, warm_blocks, **kw):
    return NaiveStep("warmup", model, ema_model, encoder, 0.0, warm_blocks, **kw)


def full_step(model, ema_model, encoder, lam, **kw):
    return NaiveStep("full", model, ema_model, encoder, lam, None, **kw)


def repa_step(model, ema_model, encoder, lam, **kw):
    return NaiveStep("repa", model, ema_model, encoder, lam, None, **kw)


def vanilla_step(model, ema_model, **kw):
    return NaiveStep("vanilla", model, ema_model, None, 0.0, None, **kw)

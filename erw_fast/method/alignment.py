"""Alignment losses between projected SiT tokens and target-encoder tokens, (B, T, C) each.

A registry: ``ALIGNMENT_LOSSES[name](z_pred_unit, z_target_unit, temperature) -> scalar`` receives
both sides already L2-normalised in fp32 (autocast off). Add a loss with ``register_alignment``.

- ``cosine`` (REPA/ERW code, default): mean over every token and sample of −cos.
- ``ntxent`` (ERW v3 text): InfoNCE per token position with in-batch negatives at ``temperature``.
  Under DDP the negatives are the process's local batch: the one loss here that depends on the
  number of processes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]
AlignmentFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

ALIGNMENT_LOSSES: Dict[str, AlignmentFn] = {}


def register_alignment(name: str):
    def deco(fn: AlignmentFn) -> AlignmentFn:
        ALIGNMENT_LOSSES[name] = fn
        return fn
    return deco


@register_alignment("cosine")
def _cosine(zp_n: torch.Tensor, zt_n: torch.Tensor, temperature: float) -> torch.Tensor:
    # REPA averages tokens, then samples: the same number for a fixed T
    return -(zp_n * zt_n).sum(dim=-1).mean()


@register_alignment("ntxent")
def _ntxent(zp_n: torch.Tensor, zt_n: torch.Tensor, temperature: float) -> torch.Tensor:
    # the positive is the same token of the same image's target; negatives: that token position in
    # the other images of the (local) batch
    B = zp_n.shape[0]
    logits = torch.einsum("btc,stc->tbs", zp_n, zt_n) / temperature  # (T, B, B)
    labels = torch.arange(B, device=zp_n.device).expand(zp_n.shape[1], B)
    return F.cross_entropy(logits.reshape(-1, B), labels.reshape(-1))


ALIGN_KINDS = tuple(ALIGNMENT_LOSSES)  # the built-in ones; check against ALIGNMENT_LOSSES for additions


def _normalize_fp32(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vectors along the last dim, computed in fp32 (same maths as F.normalize)."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _as_list(z: TensorOrList) -> List[torch.Tensor]:
    return [z] if isinstance(z, torch.Tensor) else list(z)


def _check_kind(kind: str):
    if kind not in ALIGNMENT_LOSSES:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {tuple(ALIGNMENT_LOSSES)}")


def _one_alignment(zp: torch.Tensor, zt: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if zp.dim() != 3 or zt.dim() != 3:
        raise ValueError(f"alignment_loss expects (B, T, C) tensors, got {tuple(zp.shape)} and {tuple(zt.shape)}")
    if zp.shape != zt.shape:
        raise ValueError(
            f"prediction {tuple(zp.shape)} and target {tuple(zt.shape)} differ: the model's token grid "
            "or projector width does not match the target encoder"
        )
    return ALIGNMENT_LOSSES[kind](_normalize_fp32(zp), _normalize_fp32(zt.detach()), temperature)


def alignment_loss(z_pred: TensorOrList, z_target: TensorOrList, kind: str = "cosine",
                   temperature: float = 0.1) -> torch.Tensor:
    """The alignment loss ``kind`` between projected tokens and target tokens, (B, T, C) each.

    Lists (one entry per target encoder) are averaged. The result is an fp32 scalar; both inputs
    are normalised in fp32 with autocast disabled, whatever the caller's precision.
    """
    _check_kind(kind)
    zps, zts = _as_list(z_pred), _as_list(z_target)
    if len(zps) != len(zts) or not zps:
        raise ValueError(f"got {len(zps)} predictions for {len(zts)} target encoders")
    with torch.autocast(device_type=zps[0].device.type, enabled=False):
        total = sum(_one_alignment(p, t, kind, temperature) for p, t in zip(zps, zts))
    return total / len(zps)


def alignment_from_hidden(model, h: torch.Tensor, z_target: TensorOrList, kind: str = "cosine",
                          temperature: float = 0.1, fused: Optional[Union[bool, str]] = None) -> torch.Tensor:
    """Project block tokens ``h`` (B, T, D) with every projector of ``model`` and score them.

    ``fused``: False → plain PyTorch; True/"auto"/"triton"/"torch" → the fused projection+cosine
    op (``erw_fast.ops.projection_cosine_loss``) on the projector's last linear layer; None → fused
    when the model was built with a fused setting (``model.fused`` truthy). The engine passes the
    value ``erw_fast.ops.resolve_fused`` decided. NT-Xent always takes the plain path.
    """
    projectors = model.projectors
    targets = _as_list(z_target)
    if len(targets) != len(projectors):
        raise ValueError(f"model has {len(projectors)} projectors for {len(targets)} target encoders")
    if fused is None:
        fused = getattr(model, "fused", None) not in (None, False)
    if fused is False or kind != "cosine":
        return alignment_loss([p(h) for p in projectors], targets, kind, temperature)
    from .. import ops

    backend = "auto" if fused is True else fused
    total = 0.0
    for proj, tgt in zip(projectors, targets):
        hidden = proj[:-1](h)
        last = proj[-1]
        if hidden.shape[:2] != tgt.shape[:2] or last.out_features != tgt.shape[-1]:
            raise ValueError(
                f"projected tokens {tuple(hidden.shape[:2]) + (last.out_features,)} and target "
                f"{tuple(tgt.shape)} differ: the model's token grid does not match the target encoder"
            )
        total = total + ops.projection_cosine_loss(
            hidden.reshape(-1, hidden.shape[-1]), last.weight, last.bias,
            tgt.detach().reshape(-1, tgt.shape[-1]), backend=backend,
        )
    return total / len(projectors)

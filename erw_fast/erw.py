"""The method: alignment losses, λ schedules, the warmup→full transfer, and what tells ERW, REPA and
vanilla SiT apart. Data plus small functions; the engine (``erw_fast.engine``) calls them.

- ``alignment_loss(z_pred, z_target, kind)``: negative cosine (REPA/ERW code, default) or NT-Xent
  with in-batch negatives (ERW v3 text), averaged over every token and every sample, and over
  target encoders when given lists. Normalisation is done in fp32, outside autocast.
- ``AlignmentSchedule``: λ(k) for the phase-2 step k: ``halflife`` (ERW code: λ0·2^(−k/h)),
  ``exp`` (ERW paper: λ0·exp(−k/τ)), ``constant`` (REPA).
- ``transfer_warmup(warm_state_dict, model)``: copy the warmed-up embedders, position embedding,
  blocks 0..L−1 and projectors into a freshly built full model; returns the copied keys.
- ``METHODS`` / ``get_method``: which phases a method runs and its default λ schedule.
- ``alignment_from_hidden``: projector + loss from block tokens, through the fused
  projection+cosine op when the model runs in fused mode.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

ALIGN_KINDS = ("cosine", "ntxent")
SCHEDULE_KINDS = ("halflife", "exp", "constant")


# --------------------------------------------------------------------------------------------
# Alignment losses
# --------------------------------------------------------------------------------------------
def _normalize_fp32(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vectors along the last dim, computed in fp32 (same maths as F.normalize)."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _as_list(z: TensorOrList) -> List[torch.Tensor]:
    if isinstance(z, torch.Tensor):
        return [z]
    return list(z)


def _one_alignment(zp: torch.Tensor, zt: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if zp.dim() != 3 or zt.dim() != 3:
        raise ValueError(f"alignment_loss expects (B, T, C) tensors, got {tuple(zp.shape)} and {tuple(zt.shape)}")
    if zp.shape != zt.shape:
        raise ValueError(
            f"prediction {tuple(zp.shape)} and target {tuple(zt.shape)} differ: the model's token grid "
            "or projector width does not match the target encoder"
        )
    zp_n = _normalize_fp32(zp)
    zt_n = _normalize_fp32(zt.detach())
    if kind == "cosine":
        # mean over tokens and samples of -cos (REPA averages tokens, then samples: same for fixed T)
        return -(zp_n * zt_n).sum(dim=-1).mean()
    # NT-Xent, per token position: the positive is the same token of the same image's target; the
    # negatives are that token position in the other images of the (local) batch.
    B = zp.shape[0]
    logits = torch.einsum("btc,stc->tbs", zp_n, zt_n) / temperature  # (T, B, B)
    labels = torch.arange(B, device=zp.device).expand(zp.shape[1], B)
    return F.cross_entropy(logits.reshape(-1, B), labels.reshape(-1))


def alignment_loss(z_pred: TensorOrList, z_target: TensorOrList, kind: str = "cosine",
                   temperature: float = 0.1) -> torch.Tensor:
    """Alignment loss between projected tokens and target-encoder tokens, (B, T, C) each.

    ``kind="cosine"``: mean over every token and sample of −cos(z_pred, z_target).
    ``kind="ntxent"``: InfoNCE per token position with in-batch negatives at ``temperature``.
    Lists (one entry per target encoder) are averaged. The result is an fp32 scalar; both inputs
    are normalised in fp32 with autocast disabled, whatever the caller's precision. Under DDP the
    NT-Xent negatives are the process's local batch (no all-gather): it is the one loss here that
    depends on the number of processes.
    """
    if kind not in ALIGN_KINDS:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {ALIGN_KINDS}")
    zps, zts = _as_list(z_pred), _as_list(z_target)
    if len(zps) != len(zts) or not zps:
        raise ValueError(f"got {len(zps)} predictions for {len(zts)} target encoders")
    device_type = zps[0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        total = sum(_one_alignment(p, t, kind, temperature) for p, t in zip(zps, zts))
    return total / len(zps)


def fused_loss_available() -> bool:
    """True when ``erw_fast.ops.projection_cosine_loss`` exists (the kernels engineer's fused op)."""
    try:
        from . import ops  # noqa: F401
    except Exception:
        return False
    return hasattr(ops, "projection_cosine_loss")


def alignment_from_hidden(model, h: torch.Tensor, z_target: TensorOrList, kind: str = "cosine",
                          temperature: float = 0.1, fused: Optional[Union[bool, str]] = None) -> torch.Tensor:
    """Project block tokens ``h`` (B, T, D) with every projector of ``model`` and score them.

    ``fused``: False → plain PyTorch; True/"auto"/"triton"/"torch" → the fused projection+cosine
    op (``erw_fast.ops.projection_cosine_loss``, backend given by the string, "auto" for True),
    applied to the projector's last linear layer; None → fused when the model is in fused mode
    (``model.fused`` truthy) and the op exists. NT-Xent always takes the plain path.
    """
    projectors = model.projectors
    targets = _as_list(z_target)
    if len(targets) != len(projectors):
        raise ValueError(f"model has {len(projectors)} projectors for {len(targets)} target encoders")
    if fused is None:
        fused = getattr(model, "fused", None) not in (None, False) and fused_loss_available()
    if fused is False or kind != "cosine":
        return alignment_loss([p(h) for p in projectors], targets, kind, temperature)
    from . import ops

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


# --------------------------------------------------------------------------------------------
# λ schedule
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlignmentSchedule:
    """λ(k) for the phase-2 step ``k`` (k = 0 at the first step after the transfer).

    ``halflife``: λ0 · 2^(−k / half_life) (ERW's code; ``AlignmentSchedule()(50_000) == 3.0``);
    ``exp``: λ0 · exp(−k / tau) (the paper's form; ``tau`` defaults to half_life / ln 2, which is
    the same curve); ``constant``: λ0 (REPA).
    """

    kind: str = "halflife"
    lambda0: float = 6.0
    half_life: float = 50_000
    tau: Optional[float] = None

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown lambda schedule {self.kind!r}; choose one of {SCHEDULE_KINDS}")
        if self.lambda0 < 0:
            raise ValueError(f"lambda0 must be >= 0, got {self.lambda0}")
        if self.kind == "halflife" and not self.half_life > 0:
            raise ValueError(f"half_life must be > 0, got {self.half_life}")
        if self.kind == "exp" and not (self.tau if self.tau is not None else self.half_life) > 0:
            raise ValueError("tau (or half_life) must be > 0 for the exp schedule")

    def __call__(self, k: Union[int, float]) -> float:
        if k < 0:
            raise ValueError(f"phase-2 step must be >= 0, got {k}")
        if self.kind == "constant":
            return float(self.lambda0)
        if self.kind == "halflife":
            return float(self.lambda0 * 2.0 ** (-k / self.half_life))
        tau = self.tau if self.tau is not None else self.half_life / math.log(2.0)
        return float(self.lambda0 * math.exp(-k / tau))


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """What a training method does. ``warmup``: run ERW's phase 1 and the transfer;
    ``align``: add the alignment loss in phase 2; ``schedule``: its default λ schedule kind."""

    name: str
    warmup: bool
    align: bool
    schedule: str
    description: str


METHODS: Dict[str, MethodSpec] = {
    "erw": MethodSpec("erw", True, True, "halflife",
                      "ERW: warm up blocks 0..L-1 + projector on the alignment loss, transfer, then "
                      "velocity + decaying λ·alignment"),
    "repa": MethodSpec("repa", False, True, "constant",
                       "REPA: velocity + constant λ·alignment from scratch"),
    "vanilla": MethodSpec("vanilla", False, False, "constant", "SiT: velocity loss only"),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_TRANSFER_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "projectors.")


def _strip(k: str) -> str:
    for p in ("module.", "_orig_mod."):
        while k.startswith(p):
            k = k[len(p):]
    return k.replace("._orig_mod.", ".")


def warmup_depth(warm_state_dict: Dict[str, torch.Tensor]) -> int:
    """L: the number of blocks in a warmup state dict."""
    ids = [int(m.group(1)) for k in warm_state_dict if (m := _BLOCK.match(_strip(k)))]
    if not ids:
        raise ValueError("warmup state dict holds no blocks.N.* keys")
    return max(ids) + 1


def transfer_keys(warm_state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The keys a transfer copies: embedders, pos_embed, blocks 0..L-1, projectors."""
    sd = {_strip(k) for k in warm_state_dict}
    L = warmup_depth(warm_state_dict)
    keys = []
    for k in sorted(sd):
        m = _BLOCK.match(k)
        if k == "pos_embed" or k.startswith(_TRANSFER_PREFIXES) or (m and int(m.group(1)) < L):
            keys.append(k)
    return keys


@torch.no_grad()
def transfer_warmup(warm_state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    """Copy the warmed-up weights into ``model`` (a freshly built full SiT); return the keys copied.

    Copied: ``x_embedder.*``, ``t_embedder.*``, ``y_embedder.*``, ``pos_embed``, ``blocks.0..L-1.*``
    and ``projectors.*``, with L read off the warm state dict. Everything else (later blocks, the
    final layer) keeps the model's own initialisation. Raises on any missing key or shape mismatch
    (e.g. a QK-norm or projector setting that differs between the phases).
    """
    warm = {_strip(k): v for k, v in warm_state_dict.items()}
    L = warmup_depth(warm)
    target = model.module if hasattr(model, "module") else model
    target = getattr(target, "_orig_mod", target)
    own = target.state_dict()
    depth = len(getattr(target, "blocks", []))
    if L > depth:
        raise ValueError(f"warmup state dict has {L} blocks but the model only {depth}")
    keys = transfer_keys(warm)
    problems = []
    for k in keys:
        if k not in own:
            problems.append(f"{k}: not in the full model")
        elif own[k].shape != warm[k].shape:
            problems.append(f"{k}: warmup {tuple(warm[k].shape)} vs model {tuple(own[k].shape)}")
    # every transferable key of the full model must come from the warm weights
    for k in own:
        m = _BLOCK.match(k)
        wanted = k == "pos_embed" or k.startswith(_TRANSFER_PREFIXES) or (m and int(m.group(1)) < L)
        if wanted and k not in warm:
            problems.append(f"{k}: missing from the warmup weights")
    if problems:
        raise ValueError("cannot transfer warmup weights:\n  " + "\n  ".join(problems))
    for k in keys:
        own[k].copy_(warm[k])  # state_dict tensors share storage with the parameters
    return keys

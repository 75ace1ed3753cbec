"""ERW's transfer: the warmed-up embedders, position embedding, blocks 0..L−1 and projectors are
copied into a freshly built full model; later blocks and the final layer keep their initialisation.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

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

"""ERW's transfer: the warmed-up embedders, position embedding, blocks 0..L−1 and projectors are
copied into a freshly built full model; later blocks and the final layer keep their initialisation.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

from ..models.checkpoint import _BLOCK_KEY as _BLOCK
from ..models.checkpoint import strip_key as _strip

_TRANSFER_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "projectors.")


def warmup_depth(warm_state_dict: Dict[str, torch.Tensor]) -> int:
    """L: the number of blocks in a warmup state dict."""
    ids = [int(m.group(1)) for k in warm_state_dict if (m := _BLOCK.match(_strip(k)))]
    if not ids:
        raise ValueError("warmup state dict holds no blocks.N.* keys")
    return max(ids) + 1


def _transferable(key: str, L: int) -> bool:
    m = _BLOCK.match(key)
    return key == "pos_embed" or key.startswith(_TRANSFER_PREFIXES) or bool(m and int(m.group(1)) < L)


def transfer_keys(warm_state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The keys a transfer copies: embedders, pos_embed, blocks 0..L-1, projectors."""
    L = warmup_depth(warm_state_dict)
    return [k for k in sorted({_strip(k) for k in warm_state_dict}) if _transferable(k, L)]


# what a warmup's weights must share with the full model, read off shapes: (what, key, dim, flag)
_FIT = (("width", "x_embedder.proj.weight", 0, "--model"),
        ("input channels", "x_embedder.proj.weight", 1, "--data"),
        ("patch size", "x_embedder.proj.weight", 2, "--model"),
        ("token grid (tokens)", "pos_embed", 1, "--model / the data's resolution"),
        ("MLP width", "blocks.0.mlp.fc1.weight", 0, "--model"),
        ("label rows (classes + null)", "y_embedder.embedding_table.weight", 0, "--data / --class-dropout"),
        ("projector width", "projectors.0.0.weight", 0, "--projector-dim"))


def warmup_mismatches(warm_state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    """How a warmup's weights do not fit ``model``, each naming both shapes and the flag to change."""
    warm = {_strip(k): v for k, v in warm_state_dict.items()}
    own = model.state_dict()
    out = []
    for what, key, dim, flag in _FIT:
        if key in warm and key in own and warm[key].shape[dim] != own[key].shape[dim]:
            out.append(f"{what}: warmup {warm[key].shape[dim]} vs this run {own[key].shape[dim]} ({flag})")
    zw = [warm[k].shape[0] for k in sorted(warm) if re.match(r"^projectors\.\d+\.4\.weight$", k)]
    zo = [own[k].shape[0] for k in sorted(own) if re.match(r"^projectors\.\d+\.4\.weight$", k)]
    if zw != zo:
        out.append(f"target feature dims: warmup {zw} vs this run {zo} (--encoder)")
    qw, qo = "blocks.0.attn.q_norm.weight" in warm, "blocks.0.attn.q_norm.weight" in own
    if qw != qo:
        out.append(f"QK-norm: warmup {'on' if qw else 'off'} vs this run {'on' if qo else 'off'} "
                   f"({'--qk-norm' if qw else '--no-qk-norm'})")
    L, depth = warmup_depth(warm), len(getattr(model, "blocks", []))
    if L > depth:
        out.append(f"depth: the warmup has {L} blocks, this run's model {depth} (--model)")
    return out


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
    problems += [f"{k}: missing from the warmup weights" for k in own if _transferable(k, L) and k not in warm]
    if problems:
        raise ValueError("cannot transfer warmup weights:\n  " + "\n  ".join(problems))
    for k in keys:
        own[k].copy_(warm[k])  # state_dict tensors share storage with the parameters
    return keys

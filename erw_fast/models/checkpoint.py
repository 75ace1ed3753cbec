"""Load REPA / ERW / erw_fast checkpoints into a SiT safely (``torch.load(weights_only=True)``).

Accepted files: a training checkpoint ``{model, ema, opt, args, steps}`` (REPA's layout, ours too),
or a bare state dict. REPA pickles ``args`` as an ``argparse.Namespace``; that one class is
allow-listed, nothing else is unpickled.

Checkpoints erw_fast writes carry ``checksum``: a SHA-256 of their content (every tensor's dtype,
shape and bytes, every other value's repr, in key order). ``read_checkpoint`` verifies it on every
load (training resume, sampling, export, evaluation) and names the file when it does not match;
files without one (REPA's, ERW's) load as before.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from typing import List, Optional

import torch

from .sit import SIZES, SiT

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_PROJ_KEY = re.compile(r"^projectors\.(\d+)\.4\.weight$")


CHECKSUM_KEY = "checksum"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose content does not match the checksum written with it."""


def _digest_into(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            if k != CHECKSUM_KEY:
                h.update(repr(k).encode())
                _digest_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest_into(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_checksum(obj) -> str:
    """SHA-256 (hex) of a checkpoint's content, its own ``checksum`` entry left out."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def verify_checksum(ckpt, path: str):
    if isinstance(ckpt, dict) and CHECKSUM_KEY in ckpt and content_checksum(ckpt) != ckpt[CHECKSUM_KEY]:
        raise CorruptCheckpointError(f"checkpoint {path} is damaged: its content does not match the checksum "
                                     "written with it (a partial copy or a disk error?); use an earlier checkpoint")


def read_checkpoint(path: str) -> dict:
    """Read a checkpoint file with weights_only=True and verify its checksum when it has one; clear
    errors for missing, unreadable or damaged files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _load(path)
    verify_checksum(ckpt, path)
    return ckpt


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # REPA stores args as an argparse.Namespace
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise CorruptCheckpointError(
                f"cannot read checkpoint {path}: {type(first).__name__}: {first}. "
                "Expected a torch.save file holding a state dict or {model, ema, args, steps}."
            ) from first


def _args_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    return {}


def select_state_dict(ckpt, which: str = "ema") -> dict:
    """The weights inside a checkpoint: ``ema`` or ``model`` entry, or the dict itself if bare."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, expected a dict")
    if which in ckpt and isinstance(ckpt[which], dict):
        return ckpt[which]
    for other in ("ema", "model", "state_dict"):
        if other in ckpt and isinstance(ckpt[other], dict):
            return ckpt[other]
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"no weights found in checkpoint (keys: {sorted(ckpt)[:10]})")


def infer_config(state_dict: dict, args: Optional[dict] = None) -> dict:
    """SiT constructor keywords read off a state dict's shapes (and the run's args when present)."""
    args = args or {}
    sd = _strip_prefixes(state_dict)
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight"):
        if key not in sd:
            raise ValueError(f"not a SiT state dict: key {key!r} is missing")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    proj_ids = sorted(int(m.group(1)) for k in sd if (m := _PROJ_KEY.match(k)))
    z_dims = [sd[f"projectors.{i}.4.weight"].shape[0] for i in proj_ids]
    cfg = dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        z_dims=z_dims, qk_norm=any(".attn.q_norm." in k for k in sd),
    )
    if proj_ids:
        cfg["projector_dim"] = sd["projectors.0.0.weight"].shape[0]
    if depth:
        cfg["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    # heads cannot be read off shapes: take the run's args or the registry size with that width
    heads = args.get("num_heads")
    model_name = args.get("model")
    if heads is None and isinstance(model_name, str):
        size = model_name.removeprefix("SiT-").split("/")[0]
        heads = SIZES.get(size, {}).get("num_heads")
    if heads is None:
        heads = next((s["num_heads"] for s in SIZES.values() if s["hidden_size"] == hidden), None)
    if heads is None:
        raise ValueError(f"cannot infer num_heads for hidden size {hidden}: pass num_heads=")
    cfg["num_heads"] = heads
    cfg["encoder_depth"] = min(int(args.get("encoder_depth", args.get("encoder-depth", 8))), depth)
    dropout = float(args.get("cfg_prob", args.get("class_dropout_prob", 0.1)))
    cfg["class_dropout_prob"] = dropout
    cfg["num_classes"] = int(args.get("num_classes", rows - 1 if rows > 1 else rows))
    if "use_rope" in args:
        cfg["use_rope"] = bool(args["use_rope"])
    elif ERW_ROPE_KEYS[0] in sd:  # ERW's model registers its RoPE tables only when use_rope is on
        cfg["use_rope"] = True
    return cfg


# ERW's model code keeps its 2-D RoPE (an EVA-02-style ``VisionRotaryEmbeddingFast``) as a module
# ``feat_rope`` with persistent buffers (T, head_dim): the same tables erw_fast computes (first half of
# each head's channels rotates with the row, second half with the column, adjacent pairs). They are
# checked against ours on load and never written.
ERW_ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")


class WarmupCheckpointError(ValueError):
    """A warmup checkpoint (ERW's phase 1) was given where a full model is needed."""


def is_warmup_state_dict(sd: dict) -> bool:
    """ERW's released warmup checkpoint holds blocks 0..L-1 and no final layer."""
    return any(_BLOCK_KEY.match(k) for k in sd) and not any(k.startswith("final_layer.") for k in sd)


def strip_key(k: str) -> str:
    """A parameter name without DDP's ``module.`` and torch.compile's ``_orig_mod.`` (also inside)."""
    for p in ("module.", "_orig_mod."):
        while k.startswith(p):
            k = k[len(p):]
    return k.replace("._orig_mod.", ".")


def _strip_prefixes(state_dict: dict) -> dict:
    return {strip_key(k): v for k, v in state_dict.items()}


def check_erw_rope(model: SiT, sd: dict, where: str = "checkpoint"):
    """Verify ERW's ``feat_rope`` tables (when present) equal the model's RoPE tables."""
    if not any(k in sd for k in ERW_ROPE_KEYS):
        return
    if not getattr(model, "use_rope", False):
        raise ValueError(f"{where} holds ERW's RoPE tables (feat_rope.*) but the model was built without RoPE; "
                         "load it with use_rope=True")
    for key, own in zip(ERW_ROPE_KEYS, (model.rope_cos, model.rope_sin)):
        theirs = sd.get(key)
        if theirs is None or tuple(theirs.shape) != tuple(own.shape) or not torch.allclose(
                theirs.float().cpu(), own.float().cpu(), atol=1e-5, rtol=0):
            shape = None if theirs is None else tuple(theirs.shape)
            raise ValueError(f"{where}: {key} {shape} is not erw_fast's 2-D RoPE table {tuple(own.shape)} "
                             "(rows = tokens, first half rotates with the row, second with the column, adjacent "
                             "pairs): a different RoPE, which this SiT cannot reproduce")


def load_state_dict_checked(model: SiT, state_dict: dict, strict: bool = True):
    """load_state_dict with prefixes stripped and a readable report of key mismatches. ERW's RoPE
    buffers are verified and set aside (the model computes the same tables)."""
    sd = _strip_prefixes(state_dict)
    check_erw_rope(model, sd)
    sd = {k: v for k, v in sd.items() if k not in ERW_ROPE_KEYS}
    own = model.state_dict()
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(shape_errors))
    result = model.load_state_dict(sd, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        lines = []
        if result.missing_keys:
            lines.append(f"missing from checkpoint ({len(result.missing_keys)}): {', '.join(result.missing_keys[:12])}")
        if result.unexpected_keys:
            lines.append(f"unexpected in checkpoint ({len(result.unexpected_keys)}): {', '.join(result.unexpected_keys[:12])}")
        raise ValueError("state dict keys do not match the model:\n  " + "\n  ".join(lines))
    return result


def load_checkpoint(path_or_ckpt, model: Optional[SiT] = None, which: str = "ema", strict: bool = True,
                    **overrides) -> SiT:
    """Load a REPA/ERW/erw_fast checkpoint (file path or already-loaded dict) into a SiT.

    With ``model=None`` the architecture is inferred from the weights' shapes and the stored
    args; ``overrides`` (e.g. ``num_heads=``, ``encoder_depth=``, ``use_rope=``) win over both.
    The model is returned in eval mode (no label dropout: the same call samples the same images);
    call ``.train()`` to train it further.
    """
    ckpt = read_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else path_or_ckpt
    sd = select_state_dict(ckpt, which)
    where = str(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else "the checkpoint"
    if model is None and (is_warmup_state_dict(_strip_prefixes(sd)) or
                          (isinstance(ckpt, dict) and ckpt.get("phase") == "warmup")):
        depth = 1 + max((int(m.group(1)) for k in _strip_prefixes(sd) if (m := _BLOCK_KEY.match(k))), default=-1)
        raise WarmupCheckpointError(
            f"{where} is an ERW warmup checkpoint (blocks 0..{depth - 1} aligned to the target encoder, no trained "
            "final layer): it cannot generate images. Start full training from it with "
            f"`python -m erw_fast.train --warmup-from {where} ...`")
    if model is None:
        args = _args_dict(ckpt.get("args")) if isinstance(ckpt, dict) else {}
        if not isinstance(args.get("model_config", {}), dict):
            raise ValueError(f"{where}: args['model_config'] is a {type(args['model_config']).__name__}, not a dict "
                             "of SiT settings (a damaged checkpoint?)")
        cfg = dict(args.get("model_config", {})) or infer_config(sd, args)
        cfg.update(overrides)
        model = SiT(**cfg)
    load_state_dict_checked(model, sd, strict=strict)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Run folders: which checkpoint is the latest (the one place that decides it)
# --------------------------------------------------------------------------------------------
_CKPT_NAME = re.compile(r"^(\d+)\.pt$")


def list_checkpoints(run: str) -> List[str]:
    """A run's step checkpoints ``RUN/checkpoints/NNNNNNN.pt``, oldest first (by step number)."""
    folder = os.path.join(run, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := _CKPT_NAME.match(n)))
    return [os.path.join(folder, n) for _, n in names]


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a file; for a run folder its latest step checkpoint (or, for a plain
    folder of ``*.pt`` files, the last by name)."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such checkpoint: {path}")
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(folder):
            pts = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
            if pts:
                return os.path.join(folder, pts[-1])
    raise FileNotFoundError(f"no checkpoint (*.pt) found in {path} or {os.path.join(path, 'checkpoints')}")

"""Does the target representation fit? CKNNA between every SiT block and the target encoder.

``probe_checkpoint`` runs held-out images through the model (clean, and noised along the project's
interpolant ``x_t = (1 - t) x + t ε`` with one seeded ε), mean-pools every block's output tokens and
the target encoder's features of the clean images, and reports the CKNNA of each block with the
encoder (:func:`erw_fast.evaluation.cknna.cknna`) at every noise level. A representation that does
not suit the data shows low values after ERW's warmup too; the block the alignment loss reads
(``encoder_depth - 1``, 0-based) is named in the result.

Held-out images: for the embedded digits, the fixed validation split of
``erw_fast.data.digits.split_indices`` (the images the digits encoders were not pre-trained on;
the SiT itself trains on all 1,797 digits); for other datasets (no split), the last N samples.

Warmup checkpoints (ERW's phase 1, which ``load_checkpoint`` refuses for generation) load here too:
their blocks are what the probe reads. Their live weights (``model``) are probed by default, the
ones the transfer copies; full-training checkpoints use the EMA weights, the ones sampling uses.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.checkpoint import (WarmupCheckpointError, _args_dict, _strip_prefixes, infer_config,
                                 is_warmup_state_dict, load_checkpoint, load_state_dict_checked,
                                 read_checkpoint, resolve_checkpoint, select_state_dict)
from ..models.sit import SiT
from ..data.digits import is_digits
from ..encoders.digits import DEFAULT_DIGITS_ENCODER
from ..transport import interpolate
from .cknna import cknna

__all__ = ["probe_checkpoint", "load_probe_model", "held_out_indices", "block_features", "format_table"]

DEFAULT_NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75)
WEIGHTS = ("auto", "ema", "model")


def load_probe_model(ckpt, weights: str = "auto") -> Tuple[SiT, dict]:
    """(SiT in eval mode, info) from a checkpoint file, a run folder (its latest checkpoint), a loaded
    checkpoint dict, or a SiT itself. Warmup checkpoints are built from their state dict."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if isinstance(ckpt, SiT):
        return ckpt.eval(), {"checkpoint": "(model)", "phase": None, "step": None, "weights": "given", "args": {}}
    path = resolve_checkpoint(str(ckpt)) if isinstance(ckpt, (str, os.PathLike)) else None
    raw = read_checkpoint(path) if path is not None else ckpt
    if not isinstance(raw, dict):
        raise ValueError(f"--ckpt {path or 'the checkpoint'} holds a {type(raw).__name__}, expected a dict")
    args = _args_dict(raw.get("args"))
    warm = raw.get("phase") == "warmup" or is_warmup_state_dict(_strip_prefixes(select_state_dict(raw, "model")))
    which = weights if weights != "auto" else ("model" if warm else "ema")
    sd = select_state_dict(raw, which)
    try:
        model = load_checkpoint(raw, which=which)
    except WarmupCheckpointError:
        model = SiT(**(dict(args.get("model_config") or {}) or infer_config(sd, args)))
        result = load_state_dict_checked(model, sd, strict=False)
        # ERW's released warmup file has no final layer: it is not used here; anything else must load
        missing = [k for k in result.missing_keys if not k.startswith("final_layer.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"--ckpt {path or 'the checkpoint'}: warmup weights do not fit the model built from "
                             f"them (missing {missing[:8]}, unexpected {result.unexpected_keys[:8]})")
    info = {"checkpoint": path or "(checkpoint dict)", "phase": raw.get("phase", "warmup" if warm else None),
            "step": raw.get("steps"), "weights": which, "args": args}
    return model.eval(), info


def held_out_indices(data_name: str, data, num_images: int) -> Tuple[torch.Tensor, str, int]:
    """(indices, description, size of the held-out set) of the probe's images."""
    if hasattr(data, "probe_indices"):  # image folders: spread over the class-sorted order
        return data.probe_indices(num_images)
    if data_name == "digits":
        from ..data.digits import split_indices

        _, val = split_indices(data.num_samples)
        desc = (f"digits validation split (erw_fast.data.digits.split_indices: val_fraction 0.2, seed 0; "
                f"{len(val)} images), the first {num_images}; held out from the digits encoders' pre-training, not from "
                "the SiT's (it trains on all digits)")
        return val[:num_images], desc, len(val)
    n = data.num_samples
    return (torch.arange(max(n - num_images, 0), n), f"the last {num_images} of the dataset's {n} samples "
            "(the dataset has no validation split)", n)


@torch.no_grad()
def block_features(model: SiT, x: torch.Tensor, t: float, y: torch.Tensor, batch_size: int = 256) -> List[torch.Tensor]:
    """Mean-pooled output tokens (N, D) of every block for inputs ``x`` at time ``t`` with labels ``y``
    (the model's own embedders and blocks, run one by one)."""
    per_block: List[List[torch.Tensor]] = [[] for _ in model.blocks]
    rope = model._rope()
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        h, c = model.embed(xb, torch.full((len(xb),), float(t), device=xb.device, dtype=xb.dtype), yb)
        for i, block in enumerate(model.blocks):
            h = block(h, c, rope)
            per_block[i].append(h.float().mean(dim=1).cpu())
    return [torch.cat(parts) for parts in per_block]


def _noise_levels(levels: Sequence[float]) -> List[float]:
    out = sorted({0.0, *(float(v) for v in levels)})
    bad = [v for v in out if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"--noise-levels must lie in [0, 1] (t = 0 data, t = 1 noise), got {bad}")
    return out


def _encoder_choice(data: str, encoder: Optional[str], encoder_path: Optional[str], args: dict):
    if encoder is None and _trained_without_encoder(args):
        none = ", --encoder none" if str(args.get("encoder")).strip().lower() == "none" else ""
        raise ValueError(f"--ckpt: the run was trained without a target encoder (--method {args.get('method')}{none}); "
                         "pass --encoder NAME (e.g. digits-cnn, dinov2-vit-b) to compare its blocks with one")
    if encoder is None:  # the run's own target encoder, else the data's default
        encoder = str(args.get("encoder") or (DEFAULT_DIGITS_ENCODER if is_digits(data) else "dinov2-vit-b")).split(",")[0]
        if encoder_path is None and args.get("encoder_path") and args.get("encoder") == encoder:
            encoder_path = args["encoder_path"]
    if "," in encoder:
        raise ValueError(f"--encoder {encoder!r}: the probe compares with one target encoder at a time")
    return encoder.strip(), encoder_path


def _trained_without_encoder(args: dict) -> bool:
    """Whether the checkpoint's args say its run used no target encoder (vanilla SiT, --encoder none)."""
    from ..method.recipes import METHODS

    method, enc = METHODS.get(str(args.get("method"))), args.get("encoder")
    return (method is not None and not method.needs_encoder) or (isinstance(enc, str) and enc.strip().lower() == "none")


def _check_request(model: SiT, data, num_images: int, topk: int, available: int):
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"--topk must be an integer >= 1, got {topk!r}")
    if num_images <= max(topk + 1, 3) or num_images > available:
        raise ValueError(f"--num-images must be > --topk + 1 = {topk + 1} (and >= 4) and <= {available} (the "
                         f"held-out images), got {num_images}")
    if (data.channels, data.input_size) != (model.in_channels, model.input_size):
        raise ValueError(f"--data: inputs are {data.channels}x{data.input_size}x{data.input_size}, the model reads "
                         f"{model.in_channels}x{model.input_size}x{model.input_size}")
    if data.num_classes > model.num_classes:
        raise ValueError(f"--data has {data.num_classes} classes, the model {model.num_classes}")


def probe_checkpoint(ckpt, data: str = "digits", encoder: Optional[str] = None, num_images: int = 256,
                     noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS, seed: int = 0, device="cpu",
                     encoder_path: Optional[str] = None, topk: int = 10, weights: str = "auto",
                     null_labels: bool = False, batch_size: int = 256) -> Dict:
    """CKNNA of every block's mean-pooled tokens with the target encoder's mean-pooled features of
    ``num_images`` held-out images, at t = 0 and each of ``noise_levels``. ``encoder=None``: the
    checkpoint's own target encoder (its ``--encoder-path`` too), else the data's default.
    ``null_labels``: condition on the null class instead of the true labels (where the model has one).

    Returns ``{"checkpoint", "phase", "step", "weights", "data", "num_images", "held_out", "encoder",
    "topk", "seed", "noise_levels", "aligned_block", "blocks": [{"block": i, "cknna": {t: value}}]}``.
    """
    from ..data import load_train_data
    from ..encoders import build_encoder

    levels = _noise_levels(noise_levels)
    device = torch.device(device)
    model, info = load_probe_model(ckpt, weights)
    enc_name, enc_path = _encoder_choice(data, encoder, encoder_path, info["args"])
    model = model.to(device)
    train_data = load_train_data(data, device, resolution=model.input_size)  # (image folders: the model's side)
    idx, held_out, available = held_out_indices(data, train_data, num_images)
    _check_request(model, train_data, num_images, topk, available)
    enc = build_encoder(enc_name, device=device, input_size=train_data.input_size,
                        token_grid=train_data.input_size // model.patch_size, patch_size=model.patch_size,
                        **({"path": enc_path} if enc_path else {}))
    x, y, pixels = train_data.batch(idx, seed, 0, [int(i) for i in idx], with_pixels=True)
    x, y, pixels = x.to(device).float(), y.to(device), pixels.to(device)
    if null_labels:
        if model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
            raise ValueError("--null-labels: the model has no null class (trained without label dropout)")
        y = torch.full_like(y, model.num_classes)
    target = torch.cat([enc(pixels[s:s + batch_size]).float().mean(dim=1).cpu()
                        for s in range(0, len(pixels), batch_size)])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    table = [dict() for _ in model.blocks]
    for t in levels:
        xt = interpolate(x, eps, torch.full((len(x),), t, device=device))
        for i, feats in enumerate(block_features(model, xt, t, y, batch_size)):
            table[i][t] = cknna(feats, target, topk)
    return {"checkpoint": info["checkpoint"], "phase": info["phase"], "step": info["step"], "weights": info["weights"],
            "data": data, "num_images": num_images, "held_out": held_out, "encoder": enc_name, "topk": topk,
            "seed": seed, "noise_levels": levels, "null_labels": bool(null_labels),
            "aligned_block": model.encoder_depth - 1,
            "blocks": [{"block": i, "cknna": row} for i, row in enumerate(table)]}


def format_table(result: Dict) -> str:
    """The block x noise-level table of a probe result (the aligned block marked with *)."""
    levels = result["noise_levels"]
    lines = [f"CKNNA (topk {result['topk']}) with {result['encoder']} on {result['num_images']} held-out images; "
             "rows: blocks (* = the aligned block), columns: noise level t",
             "block  " + "".join(f"{'t=' + format(t, 'g'):>9}" for t in levels)]
    for row in result["blocks"]:
        mark = "*" if row["block"] == result["aligned_block"] else " "
        lines.append(f"{row['block']:>4}{mark}  " + "".join(f"{row['cknna'][t]:>9.4f}" for t in levels))
    return "\n".join(lines)

"""ERW's transfer: the warmed-up embedders, position embedding, blocks 0..L−1 and projectors are
copied into a freshly built full model; later blocks and the final layer keep their initialisation.

``transfer_warmup``: the same task (the warmup of this run, or a reused one of the same shapes):
every transferable tensor is copied, any mismatch raises.

``plan_transfer`` / ``apply_transfer``: a warmup reused on *another* task (other data, classes,
channels, patch size, resolution). The plan lists, per parameter group, ``carry`` (copied),
``fresh`` (this run's own seeded initialisation), ``rebuild`` (the fixed sin-cos position table,
made for this run's token grid, never copied) or ``refuse`` (what must match: width, attention
heads, MLP width, QK-norm, the depth of the warmed region, the target-encoder family), each with
its reason. Label rows are matched by class name when both runs know their names; see
``plan_labels``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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


# --------------------------------------------------------------------------------------------
# A warmup reused on another task: the plan (carry / fresh / rebuild / refuse per parameter group)
# --------------------------------------------------------------------------------------------
REUSE_LABELS = ("positional", "fresh")
CARRY, FRESH, PARTIAL, REBUILD, REFUSE, OWN = "carry", "fresh", "partial", "rebuild", "refuse", "own"
_LABELS = "y_embedder.embedding_table.weight"
_MAX_NAMED = 8


@dataclass
class TransferRow:
    """One parameter group of a transfer plan: what happens to it and why."""
    group: str
    action: str          # carry | fresh | partial (label rows: some carried) | rebuild | refuse | own (not
                         # part of any warmup: the later blocks and the final layer)
    reason: str
    keys: Tuple[str, ...] = ()


@dataclass
class TransferPlan:
    """What a ``--warmup-from`` transfer does, per parameter group (``rows``); ``label_rows`` maps
    this run's label rows to the warmup's rows they are copied from (the rows not in it start fresh)."""
    rows: List[TransferRow]
    label_rows: Dict[int, int] = field(default_factory=dict)

    def of(self, *actions: str) -> List[TransferRow]:
        return [r for r in self.rows if r.action in actions]

    @property
    def refusals(self) -> List[str]:
        return [r.reason for r in self.of(REFUSE)]

    def note(self) -> Optional[str]:
        """One line naming every part that starts fresh or is rebuilt (None when everything carries)."""
        parts = [f"{r.group} ({r.reason})" for r in self.of(FRESH, PARTIAL, REBUILD)]
        return ("not carried from the warmup: " + "; ".join(parts)) if parts else None

    def record(self) -> dict:
        """The plan as the ``transfer`` record of metrics.jsonl and the checkpoint stores it."""
        return dict(carried=[r.group for r in self.of(CARRY)],
                    fresh=[dict(group=r.group, reason=r.reason) for r in self.of(FRESH, PARTIAL)],
                    rebuilt=[dict(group=r.group, reason=r.reason) for r in self.of(REBUILD)],
                    label_rows={str(k): v for k, v in sorted(self.label_rows.items())})

    def table(self) -> str:
        w = max(len(r.group) for r in self.rows)
        return "\n".join(f"{r.group:<{w}}  {r.action:<7}  {r.reason}" for r in self.rows)


def encoder_family(name: Optional[str]) -> Optional[str]:
    """``dinov2-vit-b_reg`` → ``dinov2``; other names are their own family (None: unknown)."""
    if not name:
        return None
    return ",".join(n.strip().lower().split("-vit")[0] for n in str(name).split(",") if n.strip())


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


def _class_map(warm_classes, classes, warm_k: int, k: int, reuse: Optional[str], same_data: bool):
    """(this run's class → warmup class, how) or raise ValueError (unknown names, equal counts)."""
    if reuse == "fresh":
        return {}, "--reuse-labels fresh"
    if reuse == "positional":
        return {i: i for i in range(min(k, warm_k))}, "--reuse-labels positional: class i keeps row i"
    if warm_classes is not None and classes is not None:
        where = {str(n): j for j, n in enumerate(warm_classes)}
        return {i: where[str(n)] for i, n in enumerate(classes) if str(n) in where}, "matched by class name"
    if k == warm_k and same_data:
        return {i: i for i in range(k)}, "same --data as the warmup: class i keeps row i"
    if k == warm_k:
        known = f"class names known: warmup {'yes' if warm_classes is not None else 'no'}, this run " \
                f"{'yes' if classes is not None else 'no'}"
        raise ValueError(f"label rows: the warmup and this run both have {k} classes but no names to match them by "
                         f"({known}); say --reuse-labels positional (class i keeps the warmup's row i) or "
                         "--reuse-labels fresh (every class row starts fresh)")
    return {}, f"the warmup had {warm_k} classes, this run {k}, and the names are unknown"


def plan_labels(warm_rows: int, rows: int, k: int, warm_classes=None, classes=None, warm_k: Optional[int] = None,
                reuse: Optional[str] = None, same_data: bool = False) -> Tuple[TransferRow, Dict[int, int]]:
    """The label-embedding row of a plan, and the row map (this run's row → the warmup's).

    Class rows: ``reuse`` ("positional" | "fresh") decides when given; else matching class names keep
    their rows (reordered as needed) and the others start fresh; without names on both sides, the same
    ``--data`` carries by position, equal counts are refused, other counts start every class fresh.
    The null row (label dropout's "no class", used by guidance) means the same in every task: it is
    carried when both models have one, else starts fresh."""
    if reuse is not None and reuse not in REUSE_LABELS:
        raise ValueError(f"--reuse-labels {reuse!r}: use one of {', '.join(REUSE_LABELS)}")
    warm_k = warm_k if warm_k is not None else (len(warm_classes) if warm_classes is not None else warm_rows - (rows - k))
    try:
        mapping, how = _class_map(warm_classes, classes, warm_k, k, reuse, same_data)
    except ValueError as e:
        return TransferRow("y_embedder (label rows)", REFUSE, str(e), (_LABELS,)), {}
    names = [str(n) for n in classes] if classes is not None else [str(i) for i in range(k)]
    fresh = [names[i] for i in range(k) if i not in mapping]
    parts = [f"{len(mapping)} of {k} classes carried ({how})"]
    if fresh:
        parts.append(f"fresh: {_named(fresh)}")
    if rows > k:  # this run has a null row
        if warm_rows > warm_k:
            mapping[k] = warm_k
            parts.append("null row carried")
        else:
            parts.append("null row fresh (the warmup has none)")
    action = CARRY if len(mapping) == rows else (FRESH if not mapping else PARTIAL)
    return TransferRow("y_embedder (label rows)", action, "; ".join(parts), (_LABELS,)), mapping


def _must_match(warm: Dict[str, torch.Tensor], model, L: int, warm_config: dict, encoders) -> List[str]:
    """What must be equal for the warmed-up blocks to mean anything in ``model``: each difference as
    'what: warmup A vs this run B (flag)'."""
    own = model.state_dict()
    out = []

    def differ(what, a, b, flag):
        if a is not None and b is not None and a != b:
            out.append(f"{what}: warmup {a} vs this run {b} ({flag})")

    width = warm["t_embedder.mlp.0.weight"].shape[0] if "t_embedder.mlp.0.weight" in warm else None
    differ("width", width, model.hidden_size, "--model")
    differ("attention heads", warm_config.get("num_heads"), model.num_heads, "--model")
    mlp = "blocks.0.mlp.fc1.weight"
    differ("MLP width", warm[mlp].shape[0] if mlp in warm else None, own[mlp].shape[0] if mlp in own else None,
           "--model")
    qw, qo = "blocks.0.attn.q_norm.weight" in warm, "blocks.0.attn.q_norm.weight" in own
    differ("QK-norm", "on" if qw else "off", "on" if qo else "off", "--qk-norm" if qw else "--no-qk-norm")
    if L > len(model.blocks):
        out.append(f"depth: the warmup has {L} blocks, this run's model {len(model.blocks)} (--model)")
    warm_enc, enc = encoders
    differ("target encoder family", encoder_family(warm_enc), encoder_family(enc), "--encoder")
    n_warm = len({k.split(".")[1] for k in warm if k.startswith("projectors.")})
    differ("target encoders (projectors)", n_warm, len(model.projectors), "--encoder")
    return out


def _shape_row(group: str, keys: List[str], warm, own, probes=()) -> TransferRow:
    """carry when every key is in the warmup with this run's shape, else fresh naming the difference:
    ``probes`` (key, dim, what, flag) name the dimensions that users set, checked first."""
    missing = [k for k in keys if k not in warm]
    if missing:
        return TransferRow(group, FRESH, f"{missing[0]} is not in the warmup", tuple(keys))
    why = [f"{what}: warmup {warm[k].shape[d]} vs this run {own[k].shape[d]} ({flag})" for k, d, what, flag in probes
           if k in own and warm[k].shape[d] != own[k].shape[d]]
    bad = [k for k in keys if warm[k].shape != own[k].shape]
    if bad and not why:
        why = [f"{bad[0]}: warmup {tuple(warm[bad[0]].shape)} vs this run {tuple(own[bad[0]].shape)}"]
    return TransferRow(group, FRESH, "; ".join(why), tuple(keys)) if bad else \
        TransferRow(group, CARRY, "same shapes", tuple(keys))


def plan_transfer(warm_state_dict: Dict[str, torch.Tensor], model: torch.nn.Module, *, warm_classes=None,
                  classes=None, warm_config: Optional[dict] = None, warm_encoder: Optional[str] = None,
                  encoder: Optional[str] = None, reuse_labels: Optional[str] = None,
                  same_data: bool = False) -> TransferPlan:
    """What transferring ``warm_state_dict`` (a warmup, any task) into ``model`` (this run's freshly
    built full SiT) does, per parameter group; nothing is changed. ``warm_classes``/``classes``: the
    class names (None: unknown); ``warm_config``: the warmup's model config when recorded (heads,
    classes); ``warm_encoder``/``encoder``: the target encoders (None: unknown, not compared)."""
    warm = {_strip(k): v for k, v in warm_state_dict.items()}
    target = getattr(model, "module", model)
    target = getattr(target, "_orig_mod", target)
    own, L, cfg = target.state_dict(), warmup_depth(warm), dict(warm_config or {})
    refused = _must_match(warm, target, L, cfg, (warm_encoder, encoder))
    rows = [TransferRow("must match", REFUSE, r) for r in refused]
    in_group = lambda prefix: sorted(k for k in own if k.startswith(prefix))  # noqa: E731
    rows.append(_shape_row("x_embedder (patch embedding)", in_group("x_embedder."), warm, own,
                           [("x_embedder.proj.weight", 1, "input channels", "--data"),
                            ("x_embedder.proj.weight", 2, "patch size", "--model")]))
    rows.append(_shape_row("t_embedder (time embedding)", in_group("t_embedder."), warm, own))
    label_row, label_map = plan_labels(warm[_LABELS].shape[0], own[_LABELS].shape[0], target.num_classes,
                                       warm_classes, classes, cfg.get("num_classes"), reuse_labels, same_data)
    rows.append(label_row)
    grid, warm_grid = target.x_embedder.grid_size, int(round(warm["pos_embed"].shape[1] ** 0.5))
    rows.append(TransferRow("pos_embed (sin-cos table)", CARRY, f"same {grid}x{grid} grid (a fixed table)",
                            ("pos_embed",)) if warm["pos_embed"].shape == own["pos_embed"].shape else
                TransferRow("pos_embed (sin-cos table)", REBUILD, f"made for this run's {grid}x{grid} grid (the "
                            f"warmup's {warm_grid}x{warm_grid}); never copied", ()))
    if not refused:
        blocks = [k for k in own if _transferable(k, L) and _BLOCK.match(k)]
        row = _shape_row(f"blocks 0..{L - 1} (warmed up)", blocks, warm, own)
        rows.append(row if row.action == CARRY else TransferRow(row.group, REFUSE, f"blocks: {row.reason}", row.keys))
    for i in range(len(target.projectors)):
        rows.append(_shape_row(f"projectors.{i}", in_group(f"projectors.{i}."), warm, own,
                               [(f"projectors.{i}.0.weight", 0, "projector width", "--projector-dim"),
                                (f"projectors.{i}.4.weight", 0, "target feature width", "--encoder")]))
    later = f"blocks {L}..{len(target.blocks) - 1}, " if L < len(target.blocks) else ""
    rows.append(TransferRow(f"{later}final layer", OWN, "this run's initialisation (not warmed up, as in every ERW "
                            "run)", ()))
    return TransferPlan(rows, label_map)


@torch.no_grad()
def apply_transfer(plan: TransferPlan, warm_state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    """Copy what ``plan`` carries into ``model`` (label rows per ``plan.label_rows``); return the keys
    written. Refuses (ValueError) a plan with refusals."""
    if plan.refusals:
        raise ValueError("cannot transfer the warmup: " + "; ".join(plan.refusals))
    warm = {_strip(k): v for k, v in warm_state_dict.items()}
    target = getattr(model, "module", model)
    own = getattr(target, "_orig_mod", target).state_dict()
    copied = []
    for row in plan.of(CARRY, PARTIAL):
        for k in row.keys:
            if k == _LABELS:
                for mine, theirs in plan.label_rows.items():
                    own[k][mine].copy_(warm[k][theirs])
            else:
                own[k].copy_(warm[k])
            copied.append(k)
    return sorted(copied)

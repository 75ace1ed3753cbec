"""The method: what ERW, REPA and vanilla SiT compute, independent of how training is run.

- ``alignment``: alignment losses (a registry: cosine, ntxent) and the projector + loss from block tokens.
- ``schedules``: λ(k) schedules (a registry: halflife, exp, constant).
- ``objective``: one step's loss — ERW's warmup (clean input, alignment only) or full training
  (velocity + λ·alignment) — and what a step needs (noise, targets).
- ``recipes``: the methods as phase lists (erw, repa, vanilla, erw-nowarmup) and per-size defaults.
- ``transfer``: warmup → full model.

Nothing here imports ``erw_fast.engine``.
"""
from .alignment import ALIGN_KINDS, ALIGNMENT_LOSSES, alignment_from_hidden, alignment_loss, register_alignment
from .objective import Objective, StepNeeds
from .recipes import METHODS, MODEL_DEFAULTS, MethodSpec, get_method, model_defaults
from .schedules import SCHEDULE_KINDS, SCHEDULES, AlignmentSchedule, register_schedule
from .transfer import transfer_keys, transfer_warmup, warmup_depth

__all__ = ["ALIGN_KINDS", "ALIGNMENT_LOSSES", "METHODS", "MODEL_DEFAULTS", "SCHEDULES", "SCHEDULE_KINDS",
           "AlignmentSchedule", "MethodSpec", "Objective", "StepNeeds", "alignment_from_hidden", "alignment_loss",
           "get_method", "model_defaults", "register_alignment", "register_schedule", "transfer_keys",
           "transfer_warmup", "warmup_depth"]

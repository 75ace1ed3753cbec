"""The method's public names in one import (kept for scripts written against the first release).

The code lives in ``erw_fast.method``: ``alignment`` (losses), ``schedules`` (λ), ``objective``
(a step's loss), ``recipes`` (erw / repa / vanilla / controls, per-size defaults), ``transfer``.
"""
from .method.alignment import ALIGN_KINDS, alignment_from_hidden, alignment_loss  # noqa: F401
from .method.recipes import METHODS, MethodSpec, get_method  # noqa: F401
from .method.schedules import SCHEDULE_KINDS, AlignmentSchedule  # noqa: F401
from .method.transfer import transfer_keys, transfer_warmup, warmup_depth  # noqa: F401

__all__ = ["ALIGN_KINDS", "METHODS", "SCHEDULE_KINDS", "AlignmentSchedule", "MethodSpec", "alignment_from_hidden",
           "alignment_loss", "get_method", "transfer_keys", "transfer_warmup", "warmup_depth"]

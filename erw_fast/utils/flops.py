"""FLOP counting with ``torch.utils.flop_counter`` — one function, and the formulas it lacks.

The counter counts matrix products (mm, addmm, bmm, convolution, attention); elementwise work is
free. On a CPU build it has no formula for the CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) and counted attention as 0;
they are registered here with torch's own SDPA formulas, so a step counts the same FLOPs on CPU as on
CUDA. Custom ops register their formulas next to their definition (``erw_fast.ops``).
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as _fc

aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _register():
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in _fc.flop_registry:
        _fc.register_flop_formula(fwd)(_cpu_sdpa)
    if bwd is not None and bwd not in _fc.flop_registry:
        _fc.register_flop_formula(bwd)(_cpu_sdpa_backward)


_register()


def count_flops(fn) -> float:
    """FLOPs of one call of ``fn`` (e.g. a forward + backward)."""
    with _fc.FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())

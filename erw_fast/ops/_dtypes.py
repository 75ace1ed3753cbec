"""Dtype rules shared by the fused ops: output = result_type of the inputs; math in fp32 (fp64
when an input is fp64)."""
import torch
from torch import Tensor


def _promote(*tensors: Tensor) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

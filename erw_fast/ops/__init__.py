"""Fused ops for SiT/REPA training, as ``torch.library`` custom ops (namespace ``erw_fast``).

One module per fused op (custom op + fake impl + autograd + PyTorch reference), Liger-Kernel style;
the Triton kernels live in ``erw_fast.kernels`` (one file per op as well):

- ``layernorm_modulate.py``: ``layernorm_modulate(x, shift, scale, eps=1e-6, backend="auto")``,
  ``LayerNorm(x, no affine, biased var) * (1 + scale[:, None]) + shift[:, None]``;
  x (B, T, D), shift/scale (B, D).
- ``gated_residual.py``: ``gated_residual(x, gate, y, backend="auto")``, ``x + gate[:, None] * y``;
  x, y (B, T, D), gate (B, D).
- ``projection_cosine.py``: ``projection_cosine_loss(h, weight, bias, target, backend="auto",
  chunk_size=None)``, ``mean_n -cos(h_n @ weight.T + bias, target_n)`` (REPA's alignment loss fused
  with the projector's last Linear, chunked over rows; see that module); h (N, K), weight (Z, K),
  bias (Z,) or None, target (N, Z) (no grad).  ``default_chunk_size(N, K, Z)``.
- ``_dispatch.py``: every "fused or not, which backend" decision: ``resolve_fused(setting, device)``
  (a user's ``fused`` / ``--fused`` setting -> ``False | "auto" | "triton" | "torch"``),
  ``triton_available()`` and the in-op backend choice.

Pure PyTorch references ``*_ref`` (autograd-able, also in float64).

Backends
--------
``"auto"``: Triton kernels for CUDA tensors when triton imports, PyTorch otherwise.
``"torch"``: PyTorch always.  ``"triton"``: always the Triton kernels; on CPU tensors that needs
``TRITON_INTERPRET=1`` set before the ``erw_fast.kernels.*`` kernel modules are imported, otherwise a
RuntimeError says why (never a silent fallback).  The choice is made when the op runs, so one compiled graph
works on every device.

Dtypes
------
Custom ops are not touched by autocast, so inputs may mix dtypes (fp32 residual stream with bf16
modulation vectors).  Arithmetic is fp32 (fp64 when an input is fp64, torch backend only); the
output has ``torch.result_type`` of the tensor inputs; each gradient has its input's dtype.
Non-contiguous inputs (e.g. ``chunk`` views of an adaLN output) are accepted.
"""
from ._dispatch import BACKENDS, FUSED_SETTINGS, check_fused, resolve_fused, triton_available
from .gated_residual import gated_residual, gated_residual_ref
from .layernorm_modulate import layernorm_modulate, layernorm_modulate_ref
from .projection_cosine import default_chunk_size, projection_cosine_loss, projection_cosine_loss_ref

__all__ = [
    "layernorm_modulate",
    "gated_residual",
    "projection_cosine_loss",
    "triton_available",
    "resolve_fused",
    "check_fused",
    "layernorm_modulate_ref",
    "gated_residual_ref",
    "projection_cosine_loss_ref",
    "default_chunk_size",
    "BACKENDS",
    "FUSED_SETTINGS",
]

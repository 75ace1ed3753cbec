"""Shared test set-up.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set before
the kernel modules are imported, so it is set here, first, when no CUDA device is present.
"""
import os

if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

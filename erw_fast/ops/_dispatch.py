"""The one place that decides "fused or not, and with which backend".

Two decisions, both here:

``resolve_fused(setting, device)``
    What a user's ``fused`` setting (``--fused``, ``SiT(fused=...)``, ``alignment_from_hidden(fused=...)``)
    means on a device: ``False`` (plain PyTorch, no custom ops) or the custom ops' backend
    (``"auto"``, ``"triton"``, ``"torch"``).
``_use_triton(backend, op, *tensors)``
    Inside a custom op: whether the backend runs the Triton kernels for these tensors, or PyTorch.

``triton_available()`` is the shared, cached probe both decisions use.
"""
import sys

import torch
from torch import Tensor

from .. import kernels as _kernels  # light: no triton import here

BACKENDS = ("auto", "triton", "torch")
FUSED_SETTINGS = (None, True, False, "auto", "triton", "torch")
_TRITON_OK = None


def triton_available() -> bool:
    """True when ``triton`` imports (it says nothing about a GPU being present)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
    return _TRITON_OK


# ----------------------------------------------------------------------------------------------
# fused or not: the user's setting
# ----------------------------------------------------------------------------------------------
def check_fused(setting):
    """Return ``setting`` unchanged when it is a valid fused setting, else raise ValueError."""
    if setting is None or setting is True or setting is False:
        return setting
    if isinstance(setting, str) and setting in ("auto", "triton", "torch"):
        return setting
    raise ValueError(f"--fused / fused={setting!r}: use None or 'auto' (on for CUDA with Triton), "
                     "True (on), False (off), 'triton' or 'torch'")


def resolve_fused(setting, device):
    """``setting`` (what the user gave) on ``device`` -> ``False | "auto" | "triton" | "torch"``.

    - ``None`` or ``"auto"`` (the default): ``"auto"`` when ``device`` is CUDA and Triton imports,
      else ``False``;
    - ``True``: ``"auto"`` (the custom ops, Triton on CUDA tensors and PyTorch elsewhere);
    - ``False``: ``False``; ``"triton"`` / ``"torch"``: themselves (the ops' backend, forced);
    - anything else: ValueError naming ``--fused``.

    ``False`` means the plain PyTorch expressions; a string is the ``backend=`` of the ops.  The result
    is final: pass it on as a backend, do not resolve it again (``True`` on CPU gives ``"auto"``,
    which resolved again would be the default's ``False``).  Only static values are read, so
    this is safe inside torch.compile (the Triton probe is skipped for non-CUDA devices).
    """
    check_fused(setting)
    if setting is None or setting == "auto":
        dev = device if isinstance(device, torch.device) else torch.device(device)
        return "auto" if (dev.type == "cuda" and triton_available()) else False
    if setting is True:
        return "auto"
    return setting


# ----------------------------------------------------------------------------------------------
# which backend: inside the custom ops
# ----------------------------------------------------------------------------------------------
_KERNEL_MODULES = {
    "layernorm_modulate": "layernorm_modulate",
    "gated_residual": "gated_residual",
    "projection_cosine_loss": "projection_cosine",
}


def _interpreter_enabled(op: str) -> bool:
    """Whether the Triton kernels of ``op`` can run on CPU tensors (interpreter mode).

    Triton picks interpreted vs compiled kernels when a kernel is defined, so once the op's kernel
    module is imported, the value it recorded then is what counts; before that, the environment.
    """
    mod = sys.modules.get(f"{_kernels.__name__}.{_KERNEL_MODULES[op]}")
    if mod is not None:
        return bool(getattr(mod, "INTERPRET", False))
    return _kernels.interpret_env()


def triton_runs_on(device) -> bool:
    """Whether ``backend='triton'`` can run every fused op on ``device``: CUDA with Triton, or CPU
    tensors with the Triton interpreter on (``TRITON_INTERPRET=1`` before the kernels are imported)."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if not triton_available():
        return False
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and all(_interpreter_enabled(op) for op in _KERNEL_MODULES)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _use_triton(backend: str, op: str, *tensors: Tensor) -> bool:
    _check_backend(backend)
    if backend == "torch":
        return False
    dev = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != dev:
            raise RuntimeError(f"erw_fast.{op}: all inputs must be on one device, got {dev} and {t.device}")
    if backend == "auto":
        return dev.type == "cuda" and triton_available()
    # backend == "triton": run the kernel or fail loudly.
    if not triton_available():
        raise RuntimeError(f"erw_fast.{op}(backend='triton'): triton is not importable; install triton "
                           "or use backend='auto'/'torch'")
    if dev.type == "cuda":
        return True
    if dev.type == "cpu":
        if not _interpreter_enabled(op):
            raise RuntimeError(
                f"erw_fast.{op}(backend='triton') got CPU tensors but the Triton interpreter is off: set "
                "TRITON_INTERPRET=1 before the erw_fast.kernels modules are imported, move the tensors to CUDA, "
                "or use backend='auto'/'torch'")
        return True
    raise RuntimeError(f"erw_fast.{op}(backend='triton'): unsupported device {dev}")

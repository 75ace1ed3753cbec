"""erw_fast: fast, correct Embedded Representation Warmup (ERW) training for SiT/DiT.

Public surface: ``SiT`` (REPA/ERW-compatible backbone), ``SiT_models`` (size registry),
``load_checkpoint``. Fused ops live in ``erw_fast.ops``; the method in ``erw_fast.erw``.
"""
from .models import SiT, SiT_models, build_model, load_checkpoint

__version__ = "0.1.0"
__all__ = ["SiT", "SiT_models", "build_model", "load_checkpoint", "__version__"]

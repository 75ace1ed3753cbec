"""Model code: the SiT backbone, attention backends, checkpoint loading."""
from .checkpoint import load_checkpoint
from .sit import SiT, SiT_models, build_model

__all__ = ["SiT", "SiT_models", "build_model", "load_checkpoint"]

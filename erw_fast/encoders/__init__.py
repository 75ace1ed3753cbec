"""Target encoders for representation alignment, behind one interface and a name registry.

A target encoder is a frozen ``torch.nn.Module`` (see ``TargetEncoder``) that maps images in the
model's pixel space to per-patch features ``(B, T, C)`` on a token grid. ``build_encoder(name)``
builds one by name; ``--encoder a,b`` builds several (one projector each). The embedded
``digits-ssl`` (label-free, the digits' default) and ``digits-cnn`` (label-trained) ship with the package; ``dinov2-vit-{s,b,l,g}[_reg]`` (``dinov2.py``) load DINOv2 from
a local folder, the Hugging Face / torch hub caches, or the internet.
"""
from .base import ENCODERS, TargetEncoder, build_encoder, build_encoders, check_token_grid, register_encoder
from . import digits  # noqa: F401  (registers "digits-ssl", "digits-cnn")
from . import dinov2  # noqa: F401  (registers "dinov2-vit-{s,b,l,g}[_reg]"; transformers is imported lazily)

__all__ = ["ENCODERS", "TargetEncoder", "build_encoder", "build_encoders", "check_token_grid",
           "register_encoder"]

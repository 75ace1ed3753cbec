"""The embedded target encoders of the digits (stand-ins for DINOv2): one small conv net, two trainings.

- ``digits-ssl`` (the default on the digits): trained without labels (SimCLR, see
  ``pretrain_digits_ssl.py``; ``erw_fast/assets/digits_ssl_encoder.pt`` comes from
  ``python -m erw_fast.encoders.pretrain_digits_ssl``), like DINOv2, which never saw a label.
- ``digits-cnn``: the same net trained with the digits' labels (cross-entropy, see
  ``pretrain_digits.py``; ``erw_fast/assets/digits_encoder.pt``); selectable with ``--encoder digits-cnn``.

The stride-2 feature map gives an 8x8 grid for 16x16 inputs: 64 tokens, the SiT token grid at
patch 2. The features are the last conv stage's activations, one ``width``-dim vector per patch.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import TargetEncoder, register_encoder

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ASSET = os.path.join(_ASSETS, "digits_encoder.pt")          # digits-cnn (label-trained)
SSL_ASSET = os.path.join(_ASSETS, "digits_ssl_encoder.pt")  # digits-ssl (label-free)
DEFAULT_DIGITS_ENCODER = "digits-ssl"   # the embedded digits' default target encoder (train, probe, study)
DIGITS_ENCODERS = ("digits-ssl", "digits-cnn")


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class DigitsCNN(nn.Module):
    """Conv net: 16x16 → (stem) → stride-2 → two residual conv stages → 8x8 feature map; a linear
    head on the pooled map is used only during pre-training."""

    def __init__(self, width: int = 64, stem: int = 32, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.config = dict(width=width, stem=stem, num_classes=num_classes, in_channels=in_channels)
        self.stem = _conv(in_channels, stem)
        self.down = _conv(stem, width, stride=2)
        self.stage1 = _conv(width, width)
        self.stage2 = _conv(width, width)
        self.head = nn.Linear(width, num_classes)

    def feature_map(self, x):
        h = self.down(self.stem(x))
        h = h + self.stage1(h)
        return h + self.stage2(h)

    def forward(self, x):
        return self.head(self.feature_map(x).mean(dim=(2, 3)))


class DigitsEncoder(TargetEncoder):
    """TargetEncoder over ``DigitsCNN``: images (B, 1, S, S) in [-1, 1] → (B, (S/2)^2, width). An image
    folder's input, uint8 (B, 3, S, S), is scaled to [-1, 1] and made grey first."""

    name = "digits-cnn"

    def __init__(self, net: DigitsCNN, input_size: int = 16, name: str = "digits-cnn"):
        super().__init__()
        self.name = name
        self.net = net
        self.input_size = input_size
        self.dim = net.config["width"]
        self.token_grid = input_size // 2

    def encode(self, images):
        if images.dtype == torch.uint8:  # an image folder's encoder input: uint8 RGB (grey repeated)
            images = images.float() / 127.5 - 1.0
        if images.shape[1] == 3 and self.net.config["in_channels"] == 1:  # colour → grey (ITU-R 601-2 luma)
            images = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        fmap = self.net.feature_map(images)
        return fmap.flatten(2).transpose(1, 2)


def load_digits_cnn(path: str = ASSET, recipe: str = "pretrain_digits") -> DigitsCNN:
    """The net from a weights file; a label-free file has no classification head (left at its init, unused)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digits encoder weights not found at {path}; rebuild them with "
            f"`python -m erw_fast.encoders.{recipe}`"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsCNN(**blob["config"])
    result = net.load_state_dict(blob["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit DigitsCNN (missing {missing}, unexpected {result.unexpected_keys})")
    return net


@register_encoder("digits-cnn")
def build_digits_cnn(path: str = ASSET, input_size: int = 16, **_ignored) -> DigitsEncoder:
    return DigitsEncoder(load_digits_cnn(path), input_size=input_size)


@register_encoder("digits-ssl")
def build_digits_ssl(path: str = SSL_ASSET, input_size: int = 16, **_ignored) -> DigitsEncoder:
    return DigitsEncoder(load_digits_cnn(path, "pretrain_digits_ssl"), input_size=input_size, name="digits-ssl")

"""The embedded digits classifier and feature network (independent of the training target encoder).

Recipe (``python -m erw_fast.evaluation.train_digits_classifier``): a VGG-style CNN with
BatchNorm, ReLU and max-pooling (conv 32-32 / pool / conv 64-64 / pool / conv 128 / global average
pool) and a *cosine* classifier head (10 unit-norm class prototypes), trained with a large-margin
cosine loss (CosFace: scale 16, margin 0.2) under random affine augmentation (rotation, scale,
shift) on the digits train split only. The SiT's target encoder
(``erw_fast.encoders.digits``) is a different network (strided convs, GroupNorm, GELU, plain
softmax cross-entropy with shift augmentation) whose patch tokens the SiT is aligned to; this
network shares neither weights, architecture nor objective with it, so aligning to the encoder
cannot game this metric.

FID features: the 128-d global-average-pooled activations (before the linear head).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
WEIGHTS = os.path.join(ASSETS, "digits_classifier.pt")
IMAGE_SIZE = 16
FEATURE_DIM = 128


def _conv(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsClassifier(nn.Module):
    """Images (N, 1, 16, 16) in [-1, 1] -> logits (N, 10); ``features`` gives the 128-d embedding."""

    def __init__(self, num_classes: int = 10, width: int = 32, scale: float = 16.0):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(1, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w),
        )
        self.prototypes = nn.Parameter(torch.randn(num_classes, 4 * w) / (4 * w) ** 0.5)
        self.scale = scale
        self.num_classes = num_classes
        self.feature_dim = 4 * w

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Check/resize inputs: (N, 1, H, W) (or (N, H, W), or RGB averaged) in [-1, 1] to 16x16."""
        x = images
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"digits classifier expects (N, 1, H, W) images, got shape {tuple(images.shape)}")
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[1] != 1:
            raise ValueError(f"digits classifier expects 1 or 3 channels, got {x.shape[1]}")
        x = x.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images)).mean(dim=(2, 3))

    def cosines(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (N, num_classes) between each image's embedding and each prototype."""
        return F.normalize(self.features(images), dim=1) @ F.normalize(self.prototypes, dim=1).t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``scale * cos`` (argmax = predicted digit)."""
        return self.scale * self.cosines(images)


def load_digits_classifier(path: str = WEIGHTS, device="cpu") -> DigitsClassifier:
    """The shipped classifier in eval mode (``torch.load(weights_only=True)``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; rebuild them with "
            "`python -m erw_fast.evaluation.train_digits_classifier`"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier(**blob.get("config", {}))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


@lru_cache(maxsize=4)
def _cached(path: str):
    return load_digits_classifier(path)


def shipped_classifier(path: str = WEIGHTS) -> DigitsClassifier:
    """Cached CPU instance of the shipped classifier (do not train it in place)."""
    return _cached(os.path.abspath(path))


@torch.no_grad()
def predict(images: torch.Tensor, model: DigitsClassifier = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) for images in [-1, 1]."""
    model = model or shipped_classifier()
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

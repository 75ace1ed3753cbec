"""Datasets: the embedded handwritten-digits default (``digits.py``) and SD-VAE latent datasets.

``load_train_data(name, device)`` is what training reads: ``"digits"`` (or another registered name)
or a latent dataset folder. Every dataset it returns follows ``TrainData``.

Modules: ``vae.py`` (the SD-VAE), ``shards.py`` (the on-disk layouts, read and written),
``latents.py`` (latent training data, posterior sampling), ``features.py`` (pre-extracted encoder
features), ``prepare.py`` (image folder → latent shards), ``digits.py``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .digits import DigitsData, DigitsDataset, digits_arrays, load_digits
from .latents import LatentData, LatentDataset, sample_posterior
from .shards import LatentDataError, LatentShards, RepaLayout, open_latents


@runtime_checkable
class TrainData(Protocol):
    """What the training engine reads from a dataset.

    ``batch(idx, seed, step, sample_ids, with_pixels)`` → ``(x, y, pixels)`` on the host (latents) or
    on the device (digits): the model input for dataset indices ``idx``, their labels, and the raw
    pixels the target encoder sees (or None when ``with_pixels`` is false and the data has to read
    them separately). Any randomness (the latent posterior) is seeded by ``(seed, step, sample_ids)``.
    ``sample_classes()`` → the classes of a training-time sample grid (None: all);
    ``decode(x)`` → model-space samples as images in [-1, 1] (None when no decoder is available).
    """

    num_samples: int
    num_classes: int
    channels: int
    input_size: int
    is_latent: bool
    root: Optional[str]
    labels: torch.Tensor

    def batch(self, idx, seed: int, step: int, sample_ids: Sequence[int],
              with_pixels: bool = True) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...

    def sample_classes(self) -> Optional[List[int]]: ...

    def decode(self, x: torch.Tensor) -> Optional[torch.Tensor]: ...


TRAIN_DATA: Dict[str, Callable[..., TrainData]] = {}


def register_train_data(name: str, factory: Callable[..., TrainData]):
    """Make ``load_train_data(name, device)`` return ``factory(device)``."""
    TRAIN_DATA[name] = factory
    return factory


register_train_data("digits", lambda device: DigitsData(device, size=16))


def load_train_data(name: str, device) -> TrainData:
    """A registered dataset (``digits``: the embedded one, on ``device``) or a latent dataset folder
    (shards from ``python -m erw_fast.preprocess`` or REPA's layout; read per batch on the host)."""
    if name in TRAIN_DATA:
        return TRAIN_DATA[name](device)
    if os.path.isdir(name):
        return LatentData(name)
    raise ValueError(f"unknown --data {name!r}: use 'digits' (the embedded dataset) or a latent dataset "
                     "folder made by `python -m erw_fast.preprocess`")


__all__ = ["DigitsData", "DigitsDataset", "LatentData", "LatentDataError", "LatentDataset", "LatentShards",
           "RepaLayout", "TRAIN_DATA", "TrainData", "digits_arrays", "load_digits", "load_train_data",
           "open_latents", "register_train_data", "sample_posterior"]

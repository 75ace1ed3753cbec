"""Datasets: the embedded handwritten-digits default (``digits.py``), a folder of class-labelled
images in pixel space (``imagefolder.py``) and SD-VAE latent datasets.

``load_train_data(name, device, resolution, hflip)`` is what training reads: ``"digits"`` (or another
registered name), ``imagefolder:DIR`` (or a plain DIR of class sub-folders that is not a latent
dataset), or a latent dataset folder. Every dataset it returns follows ``TrainData``.

Modules: ``vae.py`` (the SD-VAE), ``shards.py`` (the on-disk layouts, read and written),
``latents.py`` (latent training data, posterior sampling), ``features.py`` (pre-extracted encoder
features), ``prepare.py`` (image folder → latent shards), ``imagefolder.py`` (image folder → pixel
training data), ``digits.py``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .digits import DigitsData, DigitsDataset, digit_classes, digits_arrays, is_digits, load_digits
from .imagefolder import (DEFAULT_RESOLUTION, ImageFolderData, ImageFolderError, image_folder_path,
                          write_reference_npz)
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

    Optional: ``class_names`` (list of str: the label → name table, recorded by the engine in
    config.json and the checkpoints' args; image folders have it), ``probe_indices(n)`` → (indices,
    description, available) of the representation probe's images (default: the last n samples);
    ``fixed_inputs`` (bool, default False: the encoder's input of a sample never changes, so
    ``--features precomputed`` can extract every target once; the digits have it).
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


def load_train_data(name: str, device, resolution: Optional[int] = None, hflip: bool = False) -> TrainData:
    """A registered dataset (``digits``: the embedded one, on ``device``; ``digits:0-4``: a subset of
    its classes, see ``data.digits``), an image folder
    (``imagefolder:DIR`` or a DIR of class sub-folders: pixels at ``resolution``, default 32, on
    ``device``, mirrored per sample when ``hflip``) or a latent dataset folder (shards from ``python -m
    erw_fast.preprocess`` or REPA's layout; read per batch on the host). ``resolution`` and ``hflip``
    apply to image folders only (the training config refuses them elsewhere)."""
    if name in TRAIN_DATA:
        return TRAIN_DATA[name](device)
    if is_digits(name):  # digits:<classes>, a subset of the embedded digits
        return DigitsData(device, size=16, classes=digit_classes(name))
    folder = image_folder_path(name)
    if folder is not None:
        return ImageFolderData(folder, device, resolution=resolution or DEFAULT_RESOLUTION, hflip=hflip)
    if os.path.isdir(name):
        if not os.listdir(name):
            raise ValueError(f"--data {name}: the folder is empty; expected class sub-folders of images "
                             f"({name}/<class>/<image>.png) or a latent dataset from `python -m erw_fast.preprocess`")
        return LatentData(name)
    raise ValueError(f"unknown --data {name!r}: use 'digits' (the embedded dataset), imagefolder:DIR (class "
                     "sub-folders of images) or a latent dataset folder made by `python -m erw_fast.preprocess`")


def class_names_of(data, recorded: Optional[Sequence[str]] = None) -> Optional[List[str]]:
    """``data``'s class names (None when it has none) for the run's record; ``recorded`` (a resumed
    run's) must equal them: a class folder added, removed or renamed since would change the labels."""
    names = getattr(data, "class_names", None)
    names = None if names is None else [str(n) for n in names]
    if names is not None and recorded is not None and list(recorded) != names:
        raise ValueError(f"--data {getattr(data, 'root', '')}: the classes are now {names}, but the run was started "
                         f"with {list(recorded)}; restore the folder (labels are positions in the sorted "
                         "sub-folder names) or start a new run with another --out")
    return names


__all__ = ["DigitsData", "DigitsDataset", "ImageFolderData", "ImageFolderError", "LatentData", "LatentDataError",
           "LatentDataset", "LatentShards", "RepaLayout", "TRAIN_DATA", "TrainData", "class_names_of",
           "digit_classes", "digits_arrays", "image_folder_path", "is_digits", "load_digits", "load_train_data", "open_latents",
           "register_train_data", "sample_posterior", "write_reference_npz"]

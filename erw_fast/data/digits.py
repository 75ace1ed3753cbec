"""The embedded default dataset: 1,797 real handwritten digits (UCI / scikit-learn ``load_digits``).

The 8x8 originals (values 0..16) ship inside the package (``assets/digits.npz``, 45 KB, CC BY 4.0,
see ``assets/DIGITS_LICENSE.txt``); they are resized to 16x16 with bilinear interpolation, one
channel, pixel space scaled to [-1, 1].

``--data digits`` is all ten classes; ``--data digits:0-4`` or ``digits:5,6,7,8,9`` a subset of them
(``digit_classes``): the subset's images only, label k = the k-th digit of the subset in increasing
order, and the class names stay the real digits ("5".."9"), so a warmup on one subset and a run on
another match their label rows by name and the digits classifier scores class k as its real digit.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits.npz")
NUM_CLASSES = 10
PREFIX = "digits"


def is_digits(spec) -> bool:
    """``digits`` or ``digits:<classes>`` (the embedded dataset or a subset of its classes)."""
    return isinstance(spec, str) and (spec == PREFIX or spec.startswith(PREFIX + ":"))


def digit_classes(spec: str) -> tuple:
    """The digits a ``--data digits[:...]`` value selects, in increasing order: ``digits`` → 0..9,
    ``digits:0-4`` → 0..4, ``digits:7,1,3`` → 1, 3, 7 (ranges and lists can be mixed)."""
    if spec == PREFIX:
        return tuple(range(NUM_CLASSES))
    text = spec[len(PREFIX) + 1:]
    picked = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if not 0 <= lo <= hi < NUM_CLASSES:
                raise ValueError
            picked.update(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"--data {spec}: give the digits as a list or ranges of 0..9, e.g. digits:0-4 or "
                         "digits:5,6,7,8,9") from None
    return tuple(sorted(picked))


def class_digits(class_names) -> list:
    """The real digit of each class of a digits run (its class names, "0".."9"); the full set when the
    names are not recorded (runs made before the names were)."""
    return [int(n) for n in class_names] if class_names else list(range(NUM_CLASSES))


@lru_cache(maxsize=1)
def digits_arrays():
    """The raw arrays: images uint8 (1797, 8, 8) with values 0..16, labels uint8 (1797,)."""
    with np.load(ASSET) as f:
        return f["images"].copy(), f["labels"].copy()


def load_digits(size: int = 16):
    """Images float32 (1797, 1, size, size) in [-1, 1] and labels int64 (1797,)."""
    images, labels = digits_arrays()
    x = torch.from_numpy(images).float().unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(labels).long()


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0):
    """A fixed train/validation split of ``range(n)`` (same for every caller with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


class DigitsDataset(torch.utils.data.Dataset):
    """Map-style dataset over the embedded digits: ``(image (1, S, S) in [-1, 1], label)``."""

    def __init__(self, size: int = 16, split: str = "all", val_fraction: float = 0.2, seed: int = 0):
        x, y = load_digits(size)
        if split != "all":
            tr, va = split_indices(len(y), val_fraction, seed)
            idx = {"train": tr, "val": va}.get(split)
            if idx is None:
                raise ValueError(f"split={split!r}: use 'all', 'train' or 'val'")
            x, y = x[idx], y[idx]
        self.images, self.labels = x, y
        self.num_classes = NUM_CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class DigitsData:
    """The digits as the training engine reads them (the ``erw_fast.data.TrainData`` protocol): all
    images and labels in memory (``images``/``labels`` on ``device``), a batch is an index into the
    host copy (the engine pins it and copies it without a sync), the pixels are the data."""

    is_latent = False
    fixed_inputs = True  # no augmentation: the encoder's input of an image never changes
    root = None
    channels = 1
    num_classes = NUM_CLASSES

    def __init__(self, device="cpu", size: int = 16, classes=None):
        """``classes``: the digits to keep (default all ten); label k = the k-th of them."""
        x, y = load_digits(size)
        self.digits = tuple(range(NUM_CLASSES)) if classes is None else tuple(sorted(int(c) for c in classes))
        if self.digits != tuple(range(NUM_CLASSES)):
            keep = torch.isin(y, torch.tensor(self.digits))
            lookup = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
            lookup[list(self.digits)] = torch.arange(len(self.digits))
            x, y = x[keep].contiguous(), lookup[y[keep]]
        self._host = (x, y)
        self.images, self.labels = x.to(device), y.to(device)
        self.input_size = size
        self.num_classes = len(self.digits)
        self.class_names = [str(d) for d in self.digits]

    def __len__(self):
        return len(self.labels)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def batch(self, idx, seed: int, step: int, sample_ids, with_pixels: bool = True):
        """``(images[idx], labels[idx], images[idx])``: the encoder sees the images themselves (the
        seeds are unused: nothing is drawn)."""
        images, labels = self._host
        x = images[idx]
        return x, labels[idx], x

    def sample_classes(self):
        """None: a sample grid shows every class."""
        return None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the model works in pixel space."""
        return x

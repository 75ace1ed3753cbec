"""Datasets: the embedded handwritten-digits default (and, later, latent shards)."""
from .digits import DigitsDataset, digits_arrays, load_digits

__all__ = ["DigitsDataset", "digits_arrays", "load_digits"]

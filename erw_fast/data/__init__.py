"""Datasets: the embedded handwritten-digits default, and SD-VAE latent shards (``latents.py``)."""
from .digits import DigitsDataset, digits_arrays, load_digits

__all__ = ["DigitsDataset", "digits_arrays", "load_digits"]
from .latents import (LatentData, LatentDataError, LatentDataset, LatentShards, RepaLayout, open_latents,  # noqa: E402
                      sample_posterior)

__all__ += ["LatentData", "LatentDataError", "LatentDataset", "LatentShards", "RepaLayout", "open_latents",
            "sample_posterior"]

"""Latent training data: posterior moments read from disk (``shards.py``), sampled afresh each step.

Training samples the posterior each step: ``z = (mean + std · ε) · 0.18215`` with ``ε`` seeded per
(seed, step, sample) (``LatentData.posterior_noise``) or given by the caller (``sample_posterior``), so
the trainer's per-sample seeding decides every draw.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..utils.seeding import STREAM_POSTERIOR, mix_seed
from .shards import LatentDataError, open_latents
from .vae import SD_VAE_SCALE, decode_latents, load_vae


def sample_posterior(moments: torch.Tensor, eps: torch.Tensor, scale: float = SD_VAE_SCALE) -> torch.Tensor:
    """``(mean + std · eps) · scale`` from moments ``(B, 2C, h, w)`` (mean ‖ std) and ``eps (B, C, h, w)``."""
    mean, std = moments.float().chunk(2, dim=1)
    if eps.shape != mean.shape:
        raise ValueError(f"posterior noise has shape {tuple(eps.shape)}, expected {tuple(mean.shape)}")
    return (mean + std * eps.to(mean)) * scale


class LatentDataset(torch.utils.data.Dataset):
    """Map-style dataset: ``(latent (C, h, w) float32, image (3, H, W) uint8, label int64)``.

    The latent is a fresh posterior sample ``(mean + std · ε) · scale``; ``ε`` comes from
    ``eps_fn(index) -> (C, h, w)`` when given (the trainer's seeding), else from ``torch.randn``.
    ``with_images=False`` skips reading the image (precomputed features) and returns an empty tensor.
    """

    def __init__(self, root_or_store, eps_fn=None, with_images: bool = True):
        self.store = open_latents(root_or_store) if isinstance(root_or_store, (str, os.PathLike)) else root_or_store
        self.eps_fn = eps_fn
        self.with_images = with_images
        self.num_classes = self.store.num_classes

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        mom = torch.from_numpy(self.store.moments([i])[0].astype(np.float32))
        c = mom.shape[0] // 2
        eps = self.eps_fn(i) if self.eps_fn is not None else torch.randn(c, *mom.shape[1:])
        z = sample_posterior(mom[None], eps[None], self.store.scale)[0]
        img = torch.from_numpy(self.store.images([i])[0]) if self.with_images else torch.empty(0, dtype=torch.uint8)
        return z, img, torch.tensor(int(self.store.labels[i]))


class LatentData:
    """A latent dataset as the training engine reads it (the ``erw_fast.data.TrainData`` protocol).

    Fields: ``labels`` (N,) int64, ``num_samples`` (N), ``input_size`` (latent side), ``channels``
    (latent channels), ``num_classes``, ``image_size`` (raw image side), ``scale``, ``root``,
    ``is_latent = True``.
    ``batch(idx, seed, step, sample_ids, with_pixels)`` → ``(latents (B, C, h, w) float32, labels,
    encoder images (B, 3, H, W) uint8 or None)`` with ε seeded per (seed, step, sample id);
    ``read(idx, eps, device, with_images)`` is the same from a given ε; ``posterior_noise(seed, step,
    sample_ids)`` → that seeded ε.
    """

    is_latent = True

    def __init__(self, root: str):
        self.root = root
        self.store = open_latents(root)
        self.labels = torch.from_numpy(np.ascontiguousarray(self.store.labels))
        c2, h, w = self.store.moments_shape
        if h != w:
            raise LatentDataError(f"{root}: non-square latents {h}x{w}")
        self.channels = c2 // 2
        self.input_size = h
        self.image_size = int(self.store.image_shape[-1])
        self.num_classes = self.store.num_classes
        self.scale = self.store.scale

    def __len__(self):
        return len(self.labels)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def latent_shape(self):
        return (self.channels, self.input_size, self.input_size)

    def posterior_noise(self, seed: int, step: int, sample_ids: Sequence[int]) -> torch.Tensor:
        """ε (B, C, h, w), each sample's draw seeded by (seed, STREAM_POSTERIOR, step, sample id) — the
        engine's convention (``mix_seed``), so the draws do not depend on how the batch is split."""
        out = torch.empty((len(sample_ids),) + self.latent_shape)
        for r, i in enumerate(sample_ids):
            g = torch.Generator().manual_seed(mix_seed(seed, STREAM_POSTERIOR, step, int(i)))
            out[r] = torch.randn(self.latent_shape, generator=g)
        return out

    def encoder_images(self, idx, device=None) -> torch.Tensor:
        x = torch.from_numpy(self.store.images(np.asarray(idx)))
        return x.to(device, non_blocking=True) if device is not None else x

    def read(self, idx, eps: torch.Tensor, device=None, with_images: bool = True):
        """(latents ``(mean + std · eps) · scale``, labels, encoder images or None) of samples ``idx``."""
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        mom = torch.from_numpy(self.store.moments(idx))
        if device is not None:
            mom = mom.to(device, non_blocking=True)
        z = sample_posterior(mom, eps.to(mom.device), self.scale)
        y = self.labels[torch.from_numpy(idx)]
        imgs = self.encoder_images(idx, device) if with_images else None
        return z, (y.to(device) if device is not None else y), imgs

    def batch(self, idx, seed: int, step: int, sample_ids: Sequence[int], with_pixels: bool = True):
        """The training batch of step ``step`` on the host: ``read`` with ε from ``posterior_noise``."""
        eps = self.posterior_noise(seed, step, sample_ids)
        return self.read(idx, eps, None, with_images=with_pixels)

    def sample_classes(self, max_rows: int = 8) -> List[int]:
        """Classes for a training-time sample grid: all when few, else ``max_rows`` spread evenly."""
        k = self.num_classes
        if k <= max_rows:
            return list(range(k))
        return [int(round(i * (k - 1) / (max_rows - 1))) for i in range(max_rows)]

    def decoder(self, device=None):
        """The VAE recorded in the index (a local folder or a cached hub id), or None when it (or
        diffusers) is not available, with the reason in ``decoder_error``; cached after the first call."""
        if getattr(self, "_vae", False) is not False:
            return self._vae
        self._vae = None
        vae = getattr(self.store, "index", {}).get("vae") if hasattr(self.store, "index") else None
        self.decoder_error = None
        if not vae or vae.startswith("repa:"):
            self.decoder_error = "the dataset records no VAE (REPA's layout and its conversions do not)"
        else:
            try:
                self._vae = load_vae(vae, device or "cpu")
            except Exception as e:
                why = (str(e).splitlines() or [type(e).__name__])[0]
                self.decoder_error = f"the VAE {vae!r} its index.json records did not load: {why}"
        return self._vae

    def decode(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1], or None without a decoder."""
        vae = self.decoder(latents.device)
        if vae is None:
            return None
        return decode_latents(vae, latents, self.scale)

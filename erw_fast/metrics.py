"""Sample-quality metrics: Fréchet distance (FID), feature statistics, pluggable feature networks.

- :func:`frechet_distance` works in float64 with a scipy-free, numerically stable matrix square
  root: ``tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))``, the latter symmetric PSD, so both
  square roots come from symmetric eigen-decompositions (negative round-off eigenvalues clipped).
- Feature networks implement ``features(images) -> (N, D)`` for images in [-1, 1], (N, C, H, W),
  and have a ``name``. Built in: ``"digits"`` (the embedded classifier's 128-d embedding, see
  :mod:`erw_fast.evaluation.digits_classifier`) and ``"inception"`` (Inception-v3 pool3 from a
  local TorchScript file, :mod:`erw_fast.evaluation.inception`).
- Digits reference statistics: all 1,797 embedded digits (16x16) through the digits network.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch

__all__ = [
    "FeatureNetwork", "DigitsFeatures", "frechet_distance", "feature_stats", "get_feature_network",
    "compute_features", "images_from_uint8", "digits_reference_stats", "fid_from_images",
    "classifier_accuracy", "sqrtm_psd",
]


def _f64(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def sqrtm_psd(a) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64, eigh-based)."""
    a = _f64(a)
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` (NumPy arrays or tensors), float64."""
    mu1, mu2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}; "
                         "expected (D,), (D,), (D, D), (D, D)")
    for name, x in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
    r1 = sqrtm_psd(s1)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))  # only round-off can make it negative


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


# --------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureNetwork(Protocol):
    """What FID needs: ``name`` and ``features(images in [-1, 1] (N, C, H, W)) -> (N, D)``."""

    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


class DigitsFeatures:
    """The embedded digits classifier's 128-d embedding (independent of the target encoder)."""

    name = "digits"

    def __init__(self, path: Optional[str] = None, device="cpu"):
        from .evaluation.digits_classifier import WEIGHTS, load_digits_classifier

        self.model = load_digits_classifier(path or WEIGHTS, device=device)
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.to(self.device)).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).argmax(1)


def get_feature_network(name: str = "digits", path: Optional[str] = None, device="cpu") -> FeatureNetwork:
    """``"digits"`` (shipped weights, or ``path``) or ``"inception"`` (``path`` to a local TorchScript file)."""
    if name == "digits":
        return DigitsFeatures(path, device)
    if name in ("inception", "inception-v3"):
        from .evaluation.inception import InceptionFeatures

        return InceptionFeatures(path, device)
    raise ValueError(f"unknown feature network {name!r}: use 'digits' or 'inception'")


def images_from_uint8(arr) -> torch.Tensor:
    """uint8 (N, H, W, C) (the ADM ``arr_0`` layout) or (N, H, W) to float (N, C, H, W) in [-1, 1]."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {a.shape}")
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def compute_features(images, net: FeatureNetwork, batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) of images: float (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        images = images_from_uint8(images)
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images_from_uint8(images.numpy())
    out = [net.features(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).double()


@lru_cache(maxsize=2)
def _digits_reference(split: str):
    from .data.digits import DigitsDataset

    x = DigitsDataset(size=16, split=split).images
    return feature_stats(compute_features(x, DigitsFeatures()))


def digits_reference_stats(split: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the digits feature network on the embedded digits (``all``/``train``/``val``)."""
    mu, sigma = _digits_reference(split)
    return mu.copy(), sigma.copy()


def fid_from_images(images, ref_stats: Optional[Tuple] = None, net: Optional[FeatureNetwork] = None,
                    batch_size: int = 256) -> float:
    """FID of images against reference (mu, sigma); defaults: digits network and all digits."""
    net = net or DigitsFeatures()
    if ref_stats is None:
        if net.name != "digits":
            raise ValueError("pass ref_stats= for feature networks other than 'digits'")
        ref_stats = digits_reference_stats()
    mu, sigma = feature_stats(compute_features(images, net, batch_size))
    return frechet_distance(mu, sigma, *ref_stats)


@torch.no_grad()
def classifier_accuracy(images, labels, net: Optional[DigitsFeatures] = None, batch_size: int = 512) -> float:
    """Fraction of images the embedded digits classifier labels as ``labels`` (conditional accuracy)."""
    net = net or DigitsFeatures()
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        images = images_from_uint8(images)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long().reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no images")
    preds = torch.cat([net.predict(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)])
    return (preds == labels).float().mean().item()

"""Sample-quality metrics: FID, Inception Score, precision/recall, pluggable feature networks.

- :func:`frechet_distance` works in float64 with a scipy-free, numerically stable matrix square
  root: ``tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))``, the latter symmetric PSD, so both
  square roots come from symmetric eigen-decompositions (negative round-off eigenvalues clipped).
- :func:`inception_score`: ``exp(mean_i KL(p(y|x_i) || p(y)))`` per split (``p(y)`` the split's
  marginal), mean and std over consecutive 5,000-sample splits, the last one shorter (ADM's evaluator).
- :func:`check_covariance`: the one rule for a covariance FID reads (finite, symmetric, PSD within
  ``COV_TOL``); :func:`frechet_distance` applies it and refuses a meaningfully negative result.
- :func:`precision_recall`: Kynkäänniemi et al. 2019 with k = 3 (as ADM): radii are the distance
  to the k-th nearest neighbour excluding the point itself; float64, pairwise distances in blocks.
- Feature networks implement ``features(images) -> (N, D)`` for images in [-1, 1], (N, C, H, W),
  and have a ``name``; those with a classifier also give ``features_and_probabilities(images) ->
  ((N, D), (N, C) or None)``. Built in: ``"digits"`` (the embedded classifier's 128-d embedding and
  its softmax, see :mod:`erw_fast.evaluation.digits_classifier`) and ``"inception"`` (Inception-v3
  pool3 and, where the file has it, its class softmax, from a local TorchScript file,
  :mod:`erw_fast.evaluation.inception`).
- Digits reference: all 1,797 embedded digits (16x16) through the digits network.
- ``fd_<encoder>`` (:class:`EncoderFeatures`, :func:`encoder_fd_stats`): the Fréchet distance in a target
  encoder's feature space, as FD_DINOv2 (Stein et al. 2023, EDM2) — no Inception file needed, so it
  works on any data. A model aligned to that same encoder may be favoured by it: report the
  independent network's FID beside it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch

__all__ = [
    "FeatureNetwork", "DigitsFeatures", "frechet_distance", "feature_stats", "get_feature_network",
    "compute_features", "images_from_uint8", "digits_reference_stats", "fid_from_images",
    "classifier_accuracy", "sqrtm_psd", "inception_score", "precision_recall", "compute_features_and_probs",
    "digits_reference_features", "EncoderFeatures", "fd_name", "encoder_fd_stats", "check_covariance", "COV_TOL",
    "FID_TOL", "IS_SPLIT_SIZE",
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


# A covariance is accepted as symmetric when max |S - S^T| <= COV_TOL · max |S|, and as positive
# semi-definite when its smallest eigenvalue is >= -COV_TOL · its largest |eigenvalue|: float32 storage of
# a 2048 x 2048 covariance moves eigenvalues by ~3e-6 of the largest, a matrix that is not a covariance
# (e.g. a random symmetric one) by far more.
COV_TOL = 1e-5
# A Fréchet distance below -FID_TOL · (tr S1 + tr S2 + |mu1 - mu2|^2) is not round-off: it is refused.
FID_TOL = 1e-6


def check_covariance(sigma, name: str = "sigma", eigenvalues=None) -> None:
    """ValueError (naming ``name``) unless ``sigma`` is a finite, square, symmetric, positive
    semi-definite matrix within ``COV_TOL``; the one rule for every covariance FID reads."""
    s = _f64(sigma)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"{name}: shape {s.shape}, expected a square (D, D) covariance")
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: contains NaN or inf")
    scale = float(np.abs(s).max()) if s.size else 0.0
    asym = float(np.abs(s - s.T).max()) if s.size else 0.0
    if asym > COV_TOL * scale:
        raise ValueError(f"{name}: not symmetric (max |S - S^T| = {asym:.3g}, more than {COV_TOL:g} of max |S| = "
                         f"{scale:.3g}); not a covariance matrix")
    w = np.linalg.eigvalsh((s + s.T) / 2) if eigenvalues is None else eigenvalues
    top = float(np.abs(w).max()) if w.size else 0.0
    if w.size and w.min() < -COV_TOL * top:
        raise ValueError(f"{name}: not positive semi-definite (smallest eigenvalue {w.min():.4g}, largest "
                         f"|eigenvalue| {top:.4g}; tolerance {COV_TOL:g} of it); not a covariance matrix")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` (NumPy arrays or tensors), float64.
    Both covariances must be symmetric PSD (``check_covariance``); a result below ``-FID_TOL`` of the
    terms' scale raises instead of being clamped (only round-off may be, to 0)."""
    mu1, mu2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}; "
                         "expected (D,), (D,), (D, D), (D, D)")
    for name, x in (("mu1", mu1), ("mu2", mu2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
    check_covariance(s1, "sigma1")
    check_covariance(s2, "sigma2")
    r1 = sqrtm_psd(s1)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    scale = diff @ diff + np.trace(s1) + np.trace(s2)
    if value < -FID_TOL * scale:
        raise ValueError(f"Fréchet distance {value:.6g} is negative beyond round-off ({FID_TOL:g} of {scale:.6g}): "
                         "the statistics are not a mean and covariance of the same features")
    return float(max(value, 0.0))  # round-off only


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


# --------------------------------------------------------------------------------------------
# Inception Score, precision and recall
# --------------------------------------------------------------------------------------------
IS_SPLIT_SIZE = 5000  # ADM's evaluator: consecutive 5,000-sample splits (the last one may be shorter)


def inception_score(probs, split_size: int = IS_SPLIT_SIZE) -> Tuple[float, float]:
    """Inception Score of class probabilities (N, C) with the splits of ADM's evaluator: rows
    ``0..split_size-1``, ``split_size..2·split_size-1``, ... (the last split holds the rest, as ADM's
    ``range(0, N, split_size)``), per split ``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the
    split's mean prediction; returns (mean, std) over the splits (ADM prints the mean; std is 0 for one
    split). Float64; ``0 log 0 = 0`` (where ADM's ``np.log`` would give NaN). 1 for identical
    predictions, C for confident predictions balanced over C classes in every split."""
    p = _f64(probs)
    if isinstance(split_size, bool) or not isinstance(split_size, (int, np.integer)) or split_size < 1:
        raise ValueError(f"split_size must be an integer >= 1, got {split_size!r}")
    if p.ndim != 2 or p.shape[1] < 1 or p.shape[0] < 1:
        raise ValueError(f"probabilities must be (N, C) with N >= 1, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    dev = np.abs(p.sum(axis=1) - 1).max()
    if p.min() < 0 or dev > 1e-3:
        raise ValueError(f"probabilities (N, C) must be >= 0 with rows summing to 1 (min {p.min():.3g}, "
                         f"largest |row sum - 1| {dev:.3g}): pass softmax outputs, not logits")
    scores = []
    for i in range(0, p.shape[0], split_size):
        part = p[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# squared distances below this fraction of |a|^2 + |b|^2 are float64 round-off of the expansion
# |a|^2 - 2 a.b + |b|^2 (duplicates): they count as 0, so a duplicate is at distance 0 exactly
_DIST_ROUNDOFF = 1e-12


def _sq_dists(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) from precomputed squared norms, float64."""
    d = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
    return d.masked_fill_(d <= _DIST_ROUNDOFF * (na[:, None] + nb[None, :]), 0.0)


def _kth_neighbour_sq(x: torch.Tensor, nx: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest other row (itself excluded)."""
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for r0 in range(0, len(x), batch_size):
        rows = slice(r0, min(r0 + batch_size, len(x)))
        best = None
        for c0 in range(0, len(x), batch_size):
            cols = slice(c0, min(c0 + batch_size, len(x)))
            d = _sq_dists(x[rows], x[cols], nx[rows], nx[cols])
            if r0 == c0:  # the diagonal block: a point is not its own neighbour
                d.fill_diagonal_(float("inf"))
            d = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            if best is not None:
                d = torch.cat([best, d], 1)
                d = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            best = d
        out[rows] = best[:, k - 1]
    return out


def _feature_matrix(x, name: str, device) -> torch.Tensor:
    t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    t = t.to(device=device, dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or inf")
    return t


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 2048,
                     device="cpu") -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_feats`` against
    ``real_feats`` (N, D) each. Each set's manifold is the union of balls around its points with
    radius = distance to the point's k-th nearest neighbour in the same set (itself excluded);
    precision = fraction of fakes inside the real manifold, recall = fraction of reals inside the
    fake manifold (inside: distance <= radius, as ADM). Float64 on ``device``; pairwise distances
    in blocks of ``batch_size`` x ``batch_size`` (50K x 50K never held at once)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real = _feature_matrix(real_feats, "real features", device)
    fake = _feature_matrix(fake_feats, "fake features", device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features are {real.shape[1]}-d but fake features are {fake.shape[1]}-d")
    for name, f in (("real", real), ("fake", fake)):
        if len(f) <= k:
            raise ValueError(f"precision/recall with k = {k} needs more than {k} {name} samples, got {len(f)}")
    nr, nf = (real * real).sum(1), (fake * fake).sum(1)
    r_real, r_fake = _kth_neighbour_sq(real, nr, k, batch_size), _kth_neighbour_sq(fake, nf, k, batch_size)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for r0 in range(0, len(real), batch_size):
        rows = slice(r0, min(r0 + batch_size, len(real)))
        for c0 in range(0, len(fake), batch_size):
            cols = slice(c0, min(c0 + batch_size, len(fake)))
            d = _sq_dists(real[rows], fake[cols], nr[rows], nf[cols])
            fake_in[cols] |= (d <= r_real[rows, None]).any(0)
            real_in[rows] |= (d <= r_fake[None, cols]).any(1)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# --------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureNetwork(Protocol):
    """What FID and precision/recall need: ``name`` and ``features(images in [-1, 1] (N, C, H, W))
    -> (N, D)``. The Inception Score also needs class probabilities: an optional
    ``features_and_probabilities(images) -> ((N, D), (N, C))`` (one pass), switched off by a false
    ``has_probabilities`` attribute (see :func:`compute_features_and_probs`)."""

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

    @torch.no_grad()
    def features_and_probabilities(self, images: torch.Tensor):
        """128-d embedding and the classifier's softmax (N, 10) from one forward pass: logits are
        ``scale * cos(embedding, prototype)`` exactly as :meth:`DigitsClassifier.forward`."""
        f = self.model.features(images.to(self.device)).float()
        protos = torch.nn.functional.normalize(self.model.prototypes, dim=1)
        logits = self.model.scale * torch.nn.functional.normalize(f, dim=1) @ protos.t()
        return f, logits.softmax(dim=1)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probabilities(images)[1]


class EncoderFeatures:
    """A target encoder (:class:`erw_fast.encoders.TargetEncoder`) as a feature network, for ``fd_<encoder>``.

    One vector per image. Stein et al. (2023), whose FD_DINOv2 EDM2 reports, take DINOv2-ViT-L/14's
    image embedding — the final-norm CLS token that ``model(x)`` returns, not the patch tokens — since
    it is the representation DINOv2 trains to be a global descriptor. So an encoder that has such a
    token exposes it as ``global_features(images) -> (N, C)`` and it is used; an encoder without one
    (the digits CNNs) gives the mean of its patch tokens, the global embedding its training shaped
    (``digits-ssl``'s contrastive loss reads exactly that mean) and the one the CKNNA probe compares.
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = f"fd_{encoder.name}"
        self.pooling = "global" if callable(getattr(encoder, "global_features", None)) else "mean"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.encoder.parameters()).device
        images = images.to(dev)
        if getattr(self.encoder, "input_range", None) == "uint8":  # DINOv2: raw RGB in [0, 255], as the trainer feeds it
            images = ((images.float() + 1.0) * 127.5).round().clamp(0, 255)
            images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if self.pooling == "global":
            return self.encoder.global_features(images)
        return self.encoder(images).mean(dim=1)


def fd_name(encoder_name: str) -> str:
    """The metric's name in records and reports: ``fd_<encoder>`` (e.g. ``fd_digits-ssl``)."""
    return f"fd_{encoder_name}"


def encoder_fd_stats(encoder, images, batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of ``images`` (float in [-1, 1] or uint8 NHWC) in ``encoder``'s space (the reference
    side of ``fd_<encoder>``; compare with :func:`fid_from_images(images, ref, EncoderFeatures(encoder))`)."""
    return feature_stats(compute_features(images, EncoderFeatures(encoder), batch_size))


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


def _image_batches(images, batch_size: int):
    """Float (B, C, H, W) batches in [-1, 1] of float (N, C, H, W) or uint8 (N, H, W, C) images; uint8
    is converted one batch at a time (50K ImageNet images as float would take 39 GB)."""
    if torch.is_tensor(images) and images.dtype == torch.uint8:
        images = images.numpy()
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8):
        images = torch.as_tensor(images)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        yield images_from_uint8(chunk) if isinstance(chunk, np.ndarray) else chunk


@torch.no_grad()
def compute_features(images, net: FeatureNetwork, batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) of images: float (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C)."""
    out = [net.features(x).cpu() for x in _image_batches(images, batch_size)]
    return torch.cat(out).double()


@torch.no_grad()
def compute_features_and_probs(images, net: FeatureNetwork, batch_size: int = 256):
    """Features (N, D) float64 tensor and class probabilities (N, C) float64 array, or None when
    ``net`` has no classifier (no ``features_and_probabilities``, or ``has_probabilities`` false),
    from one pass over images (float (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C))."""
    if not callable(getattr(net, "features_and_probabilities", None)) or not getattr(net, "has_probabilities", True):
        return compute_features(images, net, batch_size), None
    feats, probs = [], []
    for x in _image_batches(images, batch_size):
        f, p = net.features_and_probabilities(x)
        feats.append(f.cpu())
        probs.append(None if p is None else p.cpu())
    if any(p is None for p in probs):
        return torch.cat(feats).double(), None
    return torch.cat(feats).double(), torch.cat(probs).double().numpy()


@lru_cache(maxsize=2)
def _digits_reference_features(split: str) -> torch.Tensor:
    from .data.digits import DigitsDataset

    return compute_features(DigitsDataset(size=16, split=split).images, DigitsFeatures())


def digits_reference_features(split: str = "all") -> torch.Tensor:
    """Features (N, 128) float64 of the embedded digits (``all``/``train``/``val``): the reference
    set of precision/recall on the digits."""
    return _digits_reference_features(split).clone()


@lru_cache(maxsize=8)
def _digits_reference(split: str, digits: Optional[Tuple[int, ...]] = None):
    feats = _digits_reference_features(split)
    if digits is not None:  # a subset of the classes (--data digits:0-4): its own images only
        from .data.digits import DigitsDataset

        feats = feats[torch.isin(DigitsDataset(size=16, split=split).labels, torch.tensor(digits))]
    return feature_stats(feats)


def digits_reference_stats(split: str = "all", digits=None) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the digits feature network on the embedded digits (``all``/``train``/``val``);
    ``digits``: only the images of these digits (the reference of a ``--data digits:0-4`` run)."""
    subset = None if digits is None else tuple(sorted({int(d) for d in digits}))
    mu, sigma = _digits_reference(split, None if subset == tuple(range(10)) else subset)
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


from .evaluation.cknna import cknna  # noqa: E402,F401  (the representation-similarity metric, re-exported)

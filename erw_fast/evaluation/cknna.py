"""CKNNA: centered kernel nearest-neighbour alignment (Huh et al., "The Platonic Representation
Hypothesis", ICML 2024), the unbiased variant, in float64.

For paired features ``a`` (n, d1) and ``b`` (n, d2) of the same n inputs:

- rows L2-normalised; linear kernels ``K = A Aᵀ`` and ``L = B Bᵀ``;
- kNN masks, one per space: ``M_K[i, j] = 1`` when ``j ≠ i`` is among the ``topk`` largest entries of
  row i of K (likewise ``M_L`` from L). A row's neighbours, not a symmetric relation: ``M_K`` need not
  equal ``M_Kᵀ``. Ties go to the lower index;
- the mutual mask ``M = M_K ∘ M_L``: j is a neighbour of i in *both* spaces;
- the unbiased HSIC estimator of Song et al. (2012, eq. 5) on the masked kernels, with K̃ the kernel
  with its diagonal set to zero::

      HSIC(K, L) = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))

- ``CKNNA = HSIC(K∘M, L∘M) / sqrt(HSIC(K∘M_K, K∘M_K) · HSIC(L∘M_L, L∘M_L))``.

The normalisers use each space's own mask: the paper writes CKNNA(K, L) = Align(K, L) /
sqrt(Align(K, K) Align(L, L)) with the mask built from the two kernels compared, so the mask of
Align(K, K) is ``M_K ∘ M_K = M_K`` (the authors' code computes it the same way). Hence
``cknna(x, x) == 1``; the value is unchanged by rotating either side (the kernels do not change) or by
rescaling rows. Unlike the authors' code no 1e-6 is added to the denominator; when a normaliser is
not positive (constant or degenerate features) the result is NaN.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["cknna", "hsic_unbiased", "knn_mask"]


def _features(x, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"cknna: {name} must be a 2-D array (n, features), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"cknna: {name} contains NaN or inf")
    return x


def knn_mask(kernel: np.ndarray, topk: int) -> np.ndarray:
    """0/1 matrix: row i marks the ``topk`` columns j ≠ i with the largest ``kernel[i, j]``."""
    scores = np.array(kernel, dtype=np.float64, copy=True)
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    mask = np.zeros_like(scores)
    np.put_along_axis(mask, order, 1.0, axis=1)
    return mask


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC of two n x n kernel matrices (n >= 4; need not be symmetric)."""
    n = k.shape[0]
    kt = np.array(k, dtype=np.float64, copy=True)
    lt = np.array(l, dtype=np.float64, copy=True)
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    trace = np.sum(kt * lt.T)                       # tr(K̃ L̃)
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))  # (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2))
    cross = kt.sum(axis=0) @ lt.sum(axis=1)          # 1ᵀ K̃ L̃ 1
    return float((trace + sums - 2.0 * cross / (n - 2)) / (n * (n - 3)))


def cknna(a, b, topk: int = 10) -> float:
    """Unbiased CKNNA of paired features ``a`` (n, d1) and ``b`` (n, d2) with ``topk`` neighbours
    (see the module doc for the formulas). Arrays or tensors; computed in float64."""
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ValueError(f"cknna: topk must be an integer >= 1, got {topk!r}")
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cknna: a and b must have the same number of rows (paired inputs), got {a.shape[0]} "
                         f"and {b.shape[0]}")
    n = a.shape[0]
    if n <= topk + 1 or n < 4:
        raise ValueError(f"cknna: needs more than topk + 1 = {topk + 1} rows (and at least 4), got n = {n}")

    def unit_rows(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit_rows(a), unit_rows(b)
    k, l = a @ a.T, b @ b.T
    mask_k, mask_l = knn_mask(k, topk), knn_mask(l, topk)
    mutual = mask_k * mask_l
    num = hsic_unbiased(k * mutual, l * mutual)
    den = hsic_unbiased(k * mask_k, k * mask_k) * hsic_unbiased(l * mask_l, l * mask_l)
    if not den > 0:
        return float("nan")
    return float(num / math.sqrt(den))

"""The linear interpolant used by REPA/ERW (time convention: t = 0 data, t = 1 noise).

    x_t = (1 - t) * x + t * eps,      velocity target v = eps - x,      t ~ U[0, 1]

The velocity loss is the mean squared error over every dimension of every sample (SiT/REPA
``mean_flat`` then mean over the batch, which is the same number for equal-sized samples).
Random draws are *not* made here: the engine draws ``eps`` and ``t`` per sample index so runs are
reproducible across GPU counts, and passes them in.
"""
from __future__ import annotations

import torch


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps for per-sample times ``t`` of shape (B,)."""
    te = _expand(t, x)
    return (1 - te) * x + te * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = eps - x (independent of t for the linear path)."""
    return noise - x


def velocity_loss(pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity MSE, mean over all dimensions and samples, computed in fp32."""
    target = velocity_target(x, noise)
    return (pred.float() - target.float()).square().mean()

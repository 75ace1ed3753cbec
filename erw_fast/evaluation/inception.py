"""Inception-v3 features for ImageNet FID, loaded from a local TorchScript file (no downloads).

Supported file: the TorchScript Inception used by StyleGAN2-ADA/StyleGAN3 and ``clean-fid``
(``inception-2015-12-05.pt`` / the ``.pkl`` from NVIDIA, the TF-FID graph ported to PyTorch). It
takes uint8-valued NCHW images in [0, 255] at any resolution (it resizes to 299 itself) and, called
with ``return_features=True``, returns the 2048-d pool3 features that the ADM evaluator also uses.
Any other TorchScript module mapping (N, 3, H, W) images to (N, D) features also works if you pass
``input_range``/``call_kwargs`` to match it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

ENV_VAR = "ERW_FAST_INCEPTION"


class InceptionFeatures:
    """Callable ``features(images in [-1, 1], (N, C, H, W)) -> (N, 2048)`` around a local TorchScript file."""

    name = "inception-v3"

    def __init__(self, path: Optional[str] = None, device="cpu", input_range: str = "uint8",
                 call_kwargs: Optional[dict] = None):
        path = path or os.environ.get(ENV_VAR)
        if not path:
            raise FileNotFoundError(
                "Inception-v3 FID needs local weights: pass --inception PATH (or set "
                f"{ENV_VAR}) to a TorchScript Inception such as NVIDIA's inception-2015-12-05.pt "
                "(StyleGAN3 / clean-fid); nothing is downloaded"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found: {path}")
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated but is what these files need
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(path, map_location=device).eval()
        except Exception as e:  # not TorchScript
            raise ValueError(f"cannot load {path} as a TorchScript module ({type(e).__name__}: {e}); "
                             "export the Inception network with torch.jit.save first") from e
        if input_range not in ("uint8", "unit", "symmetric"):
            raise ValueError("input_range must be 'uint8' ([0, 255]), 'unit' ([0, 1]) or 'symmetric' ([-1, 1])")
        self.device, self.input_range = torch.device(device), input_range
        self.call_kwargs = {"return_features": True} if call_kwargs is None else dict(call_kwargs)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.input_range == "uint8":
            x = ((x + 1) * 127.5).round().clamp(0, 255)
        elif self.input_range == "unit":
            x = (x + 1) / 2
        out = self.net(x, **self.call_kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).float()

"""Inception-v3 features (and class probabilities) for ImageNet metrics, from a local TorchScript file
(no downloads).

Supported file: the TorchScript Inception used by StyleGAN2-ADA/StyleGAN3 and ``clean-fid``
(``inception-2015-12-05.pt`` / the ``.pkl`` from NVIDIA, the TF-FID graph ported to PyTorch). It
takes uint8-valued NCHW images in [0, 255] at any resolution (it resizes to 299 itself) and, called
with ``return_features=True``, returns the 2048-d pool3 features that the ADM evaluator also uses.
Any other TorchScript module mapping (N, 3, H, W) images to (N, D) features also works (called
without keyword arguments when its ``forward`` takes no ``return_features``; ``input_range``/
``call_kwargs`` to match it otherwise).

Class probabilities (for the Inception Score), ``prob_kwargs="auto"``: a module whose ``forward``
takes ``return_features`` is called with ``return_features=False`` (plus ``no_output_bias=True``
when it takes that argument: NVIDIA's file then returns the 1008-way softmax of
``features @ output.weight.T`` without the bias, which is what ADM's and StyleGAN's Inception Score
use). Its output counts as probabilities when it is >= 0 with rows summing to 1 (within 1e-3),
otherwise as logits (softmax applied). A module without ``return_features`` gives features only:
no Inception Score (``has_probabilities`` is false), unless ``prob_kwargs`` says how to call it.
When the module has ``no_output_bias`` and an ``output`` layer whose weight is (C, D), the
probabilities come from the features in the same pass (``softmax(features @ W.T)``, the module's
own no-bias path); this is checked against the module's own call on the first batch, and a
mismatch falls back to calling the module twice per batch.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

ENV_VAR = "ERW_FAST_INCEPTION"
_PROB_TOL = 1e-3  # |row sum - 1| below which a module's class output counts as probabilities


def _forward_args(net) -> set:
    try:
        return {a.name for a in net.forward.schema.arguments}
    except (AttributeError, RuntimeError):
        return set()


class InceptionFeatures:
    """``features(images in [-1, 1], (N, C, H, W)) -> (N, 2048)`` around a local TorchScript file, and
    ``features_and_probabilities`` where the file has a classifier head (see the module docstring)."""

    name = "inception-v3"

    def __init__(self, path: Optional[str] = None, device="cpu", input_range: str = "uint8",
                 call_kwargs: Optional[dict] = None, prob_kwargs="auto"):
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
        self.path, self.device, self.input_range = path, torch.device(device), input_range
        args = _forward_args(self.net)
        if call_kwargs is None:  # NVIDIA's file: return_features=True; a module without that argument: none
            call_kwargs = {} if args and "return_features" not in args else {"return_features": True}
        self.call_kwargs = dict(call_kwargs)
        if prob_kwargs == "auto":
            prob_kwargs = None
            if "return_features" in args:
                prob_kwargs = {"return_features": False}
                if "no_output_bias" in args:
                    prob_kwargs["no_output_bias"] = True
        self.prob_kwargs = None if prob_kwargs is None else dict(prob_kwargs)
        self._head = self._no_bias_head() if self.prob_kwargs and self.prob_kwargs.get("no_output_bias") else None
        self._head_checked = False

    @property
    def has_probabilities(self) -> bool:
        return self.prob_kwargs is not None

    def _no_bias_head(self) -> Optional[torch.Tensor]:
        w = getattr(getattr(self.net, "output", None), "weight", None)
        return w.detach() if torch.is_tensor(w) and w.dim() == 2 else None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.input_range == "uint8":
            x = ((x + 1) * 127.5).round().clamp(0, 255)
        elif self.input_range == "unit":
            x = (x + 1) / 2
        return x

    def _call(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.net(x, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).float()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._call(self._prepare(images), self.call_kwargs)

    def _as_probabilities(self, out: torch.Tensor) -> torch.Tensor:
        if out.min() >= 0 and (out.sum(1) - 1).abs().max() <= _PROB_TOL:
            return out
        return out.softmax(dim=1)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_probabilities:
            raise ValueError(f"{self.path}: this TorchScript module takes no return_features argument, so there "
                             "is no known way to get its class output; no Inception Score (pass prob_kwargs=)")
        return self._as_probabilities(self._call(self._prepare(images), self.prob_kwargs))

    @torch.no_grad()
    def features_and_probabilities(self, images: torch.Tensor):
        """(features (N, D), probabilities (N, C) or None when the file has no class output)."""
        x = self._prepare(images)
        feats = self._call(x, self.call_kwargs)
        if not self.has_probabilities:
            return feats, None
        w = self._head
        if w is not None and w.shape[1] == feats.shape[1]:
            probs = torch.nn.functional.linear(feats, w.to(feats.device, feats.dtype)).softmax(dim=1)
            if self._head_checked:
                return feats, probs
            own = self._as_probabilities(self._call(x, self.prob_kwargs))
            self._head_checked = True
            if own.shape == probs.shape and torch.allclose(own, probs, rtol=1e-3, atol=1e-5):
                return feats, probs
            self._head = None  # the module's class output is something else: call it every time
            return feats, own
        return feats, self._as_probabilities(self._call(x, self.prob_kwargs))

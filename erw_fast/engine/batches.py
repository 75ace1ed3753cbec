"""What a training step reads: a ``Batch`` on the device, built from (seed, step) alone.

``BatchSource.get(k)`` gives phase step ``k``'s batch: the rank's slice of the global batch (seeded
data order), the objective's per-sample draws (ε, t, label drop), the pixels the target encoder reads
(or its precomputed features). The host part is a pure function of k, so it can run ahead in a
background thread (``--prefetch``, latent data) with identical batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..utils.seeding import BatchIndexer
from .prefetch import Prefetcher, map_tensors


@dataclass
class Batch:
    x: torch.Tensor                      # clean input (B, C, H, W): pixels or scaled latents
    y: torch.Tensor                      # labels (B,)
    noise: Optional[torch.Tensor]        # ε (None in the warmup)
    t: torch.Tensor                      # per-sample time (B,)
    drop: torch.Tensor                   # label dropped for guidance (B,) bool
    pixels: Optional[torch.Tensor]       # what an online target encoder reads
    features: List[Optional[torch.Tensor]]  # per encoder: precomputed features, or None (run it online)

    def split(self, n: int) -> List["Batch"]:
        """``n`` equal micro-batches (rows in order), for gradient accumulation."""
        rows = self.x.shape[0]
        if n < 1 or rows % n:
            raise ValueError(f"--grad-accum {n} does not divide the per-process batch of {rows}")
        size = rows // n

        def part(v, i):
            return None if v is None else v[i * size:(i + 1) * size]

        return [Batch(part(self.x, i), part(self.y, i), part(self.noise, i), part(self.t, i), part(self.drop, i),
                      part(self.pixels, i), [part(f, i) for f in self.features]) for i in range(n)]


class BatchSource:
    def __init__(self, data, encoders, objective, indexer: BatchIndexer, seed: int, dropout: float,
                 offset: int, device, prefetch: int = 0):
        self.data, self.encoders, self.objective = data, encoders, objective
        self.indexer, self.seed, self.dropout, self.offset, self.device = indexer, seed, dropout, offset, device
        self.shape = (data.channels, data.input_size, data.input_size)
        self.precomputed = [getattr(e, "precomputed", False) for e in encoders]
        self.need_pixels = not all(self.precomputed)
        self.pin = torch.device(device).type == "cuda"
        self._prefetch = Prefetcher(self.host, depth=prefetch if data.is_latent else 0)

    def host(self, k: int):
        """Step ``k``'s tensors before the transfer to the device (a pure function of k)."""
        gstep = self.offset + k
        idx, j = self.indexer.batch(gstep)
        ids = j.tolist()
        aligning = self.objective.needs(k).targets  # once the alignment stopped: no image or feature reads
        x, y, pixels = self.data.batch(idx, self.seed, gstep, ids, with_pixels=self.need_pixels and aligning)
        noise, t, drop = self.objective.draws(self.seed, gstep, ids, self.shape, self.dropout)
        features = [enc.features(idx) if p and aligning else None for enc, p in zip(self.encoders, self.precomputed)]
        out = (x, y, noise, t, drop, pixels, features)
        if self.pin:
            out = map_tensors(lambda v: v.pin_memory() if v.device.type == "cpu" else v, out)
        return out

    def get(self, k: int) -> Batch:
        x, y, noise, t, drop, pixels, features = map_tensors(
            lambda v: v.to(self.device, non_blocking=True), self._prefetch.get(k))
        return Batch(x, y, noise, t, drop, pixels, list(features))

    def close(self):
        self._prefetch.close()

"""Every seed in erw_fast is decided here: a splitmix64 hash of integers.

Two conventions, both kept bit-for-bit from the first release (changing either changes every run):

- ``mix_seed(*values)``: training. The engine draws each sample's noise, time and label drop from
  ``mix_seed(seed, stream, step, global_sample_index)``; the data order from
  ``mix_seed(seed, STREAM_DATA, epoch)``; the initialisation from ``mix_seed(seed, STREAM_INIT, warm)``;
  latent posterior noise from ``mix_seed(seed, STREAM_POSTERIOR, step, index)``.
- ``index_seed(seed, index)``: sampling. Sample ``index`` of a sampling run depends only on
  ``(seed, index)``, whatever the batch size or the number of processes.

``sample_draws`` and ``BatchIndexer`` are the training draws built on ``mix_seed``: a run is
reproducible whatever the number of processes, and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

from typing import Dict

import torch

_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15

# streams of mix_seed (the second value after the run's seed)
STREAM_DATA, STREAM_WARMUP, STREAM_TRAIN, STREAM_INIT = 1, 2, 3, 4
STREAM_POSTERIOR = 5        # latent posterior ε
STREAM_HFLIP = 6            # image folders: the horizontal flip
# sampling during training: the run's seed + these offsets seed the sample grid and the online evaluation
GRID_SEED_OFFSET = 1_000_003
EVAL_SEED_OFFSET = 2_000_003


def _finalise(z: int) -> int:
    """splitmix64's output mix (Stafford's variant 13)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (order matters); nearby tuples give unrelated seeds."""
    z = 0x2545F4914F6CDD1D
    for v in values:
        z = (z ^ (int(v) & _M64)) & _M64
        z = _finalise((z + _GOLDEN) & _M64)
    return z & 0x7FFFFFFFFFFFFFFF


def index_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a sampling run with ``seed``."""
    return _finalise((int(seed) * _GOLDEN + int(index) + 1) & _M64) & 0x7FFFFFFFFFFFFFFF


def index_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    """A generator for sample ``index`` of a sampling run: independent of batch and world size."""
    return torch.Generator(device=device).manual_seed(index_seed(seed, index))


def sample_draws(seed: int, stream: int, step: int, indices, shape, dropout: float, with_noise: bool = True):
    """Per-sample noise (len, *shape), time (len,) and label-drop (len,) bool, each sample's draws
    seeded by (seed, stream, step, global sample index): independent of how the batch is split."""
    noise, times, drops = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(mix_seed(seed, stream, step, int(i)))
        drops.append(torch.rand((), generator=g) < dropout)
        times.append(torch.rand((), generator=g))
        if with_noise:
            noise.append(torch.randn(tuple(shape), generator=g))
    nz = torch.stack(noise) if with_noise else None
    return nz, torch.stack(times), torch.stack(drops)


class BatchIndexer:
    """Global batch ``step`` = positions [step*G, (step+1)*G) of an endless stream of seeded epoch
    permutations of the dataset; rank r takes its contiguous slice of the global batch."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.n, self.G, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.local = global_batch // world
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, STREAM_DATA, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, step: int):
        """(dataset indices, global sample indices within the batch) of this rank."""
        j = torch.arange(self.rank * self.local, (self.rank + 1) * self.local)
        pos = step * self.G + j
        epochs, offsets = pos // self.n, pos % self.n
        idx = torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets)])
        return idx, j

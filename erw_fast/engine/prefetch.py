"""Input prefetch: the next batches' host work (shard reads, posterior sampling, pinning) runs in a
background thread while the current step trains."""
from __future__ import annotations

from typing import Dict

import torch


def map_tensors(fn, obj):
    """``fn`` applied to every tensor in nested tuples/lists (None and other leaves are kept)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


class Prefetcher:
    """``get(k)`` returns ``fn(k)``; with ``depth > 0`` a background thread computes the next
    ``depth`` results while the caller trains on this one. ``fn`` must be a pure function of ``k``
    (the training batches are: every draw is seeded by (seed, step, sample)), so the results are
    the same with and without prefetching. The thread does host work only: shard reads (NumPy
    releases the GIL), posterior sampling, pinning."""

    def __init__(self, fn, depth: int = 0):
        self.fn, self.depth = fn, max(0, int(depth))
        self._pool = None
        self._futures: Dict[int, object] = {}
        if self.depth:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erw_fast-prefetch")

    def get(self, k: int):
        if self._pool is None:
            return self.fn(k)
        fut = self._futures.pop(k, None) or self._pool.submit(self.fn, k)
        for ahead in range(k + 1, k + 1 + self.depth):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(self.fn, ahead)
        for stale in [s for s in self._futures if s < k or s > k + self.depth]:
            self._futures.pop(stale).cancel()
        return fut.result()

    def close(self):
        if self._pool is not None:
            for f in self._futures.values():
                f.cancel()
            self._futures.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

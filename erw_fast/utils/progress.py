"""A tiny dependency-free progress bar (tqdm is used when installed, but is not a dependency)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


class Progress:
    """Wrap an iterable; ``update(n)`` advances by n units (default: one per item)."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", stream=None, disable: bool = False, min_interval: float = 0.5):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.disable, self.min_interval = disable, min_interval
        self.n, self.t0, self._last = 0, time.time(), 0.0

    def _render(self, final: bool = False):
        if self.disable:
            return
        now = time.time()
        if not final and now - self._last < self.min_interval:
            return
        self._last = now
        el = now - self.t0
        rate = self.n / el if el > 0 else 0.0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 24)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            msg = f"\r{self.desc} |{bar:<24}| {self.n}/{self.total} {self.unit} [{el:.0f}s<{eta:.0f}s, {rate:.2f} {self.unit}/s]"
        else:
            msg = f"\r{self.desc} {self.n} {self.unit} [{el:.0f}s, {rate:.2f} {self.unit}/s]"
        self.stream.write(msg + ("\n" if final else ""))
        self.stream.flush()

    def update(self, n: int = 1):
        self.n += n
        self._render()

    def close(self):
        self._render(final=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


def progress(iterable=None, total=None, desc="", unit="it", disable=False):
    """tqdm when installed, else :class:`Progress`."""
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable)
    except ImportError:
        return Progress(iterable, total=total, desc=desc, unit=unit, disable=disable)

"""Progress output, one mechanism for every long loop: tqdm (a core dependency).

- ``progress(iterable, total, desc, unit, disable)``: a tqdm bar for loops (sampling, feature
  extraction, preprocessing, evaluation).
- ``RunProgress``: a training run's terminal output — one bar per phase with the loss terms as
  postfix, and messages (start line, transfer, summary) printed above the bar.

On a terminal the bar redraws in place; elsewhere (a log file, CI) tqdm prints a line at most every
``NON_TTY_INTERVAL`` seconds, and always the last one, once (closing a bar whose final state is
already printed does not print it again).
"""
from __future__ import annotations

import sys
from typing import Dict, Optional

from tqdm import tqdm

NON_TTY_INTERVAL = 10.0


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _interval(stream) -> float:
    return 0.1 if _isatty(stream) else NON_TTY_INTERVAL


class _Bar(tqdm):
    """tqdm whose ``close`` does not repeat a final state that is already printed: tqdm's own close
    always prints the bar once more, a duplicate last line in a log file."""

    def close(self):
        if getattr(self, "disable", True) or getattr(self, "_tty", True) or self.n != self.last_print_n:
            return super().close()
        self.display = lambda *args, **kwargs: None  # the newline that ends the bar, nothing more
        try:
            super().close()
        finally:
            del self.display


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", disable: bool = False, stream=None):
    stream = stream or sys.stderr
    bar = _Bar(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream,
               mininterval=_interval(stream), dynamic_ncols=True)
    bar._tty = _isatty(stream)
    return bar


class RunProgress:
    """``update(phase, step, total, fields, final)`` moves the phase's bar to ``step``;
    ``message(text)`` prints a line (``enabled`` turns both off; ``bar=False`` only the bar)."""

    def __init__(self, enabled: bool = True, stream=None, bar: bool = True):
        self.enabled = enabled
        self.bar = bar and enabled
        self.stream = stream or sys.stderr
        self._bar: Optional[tqdm] = None
        self._phase: Optional[str] = None

    def update(self, phase: str, step: int, total: int, fields: Dict[str, float], final: bool = False):
        if not self.bar:
            return
        if self._phase != phase:
            self.close()
            self._bar = progress(total=total, desc=phase, unit="step", stream=self.stream)
            self._phase = phase
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()},
                              refresh=False)
        self._bar.update(step - self._bar.n)
        if final:
            self.close()

    def message(self, text: str):
        if self.enabled:
            tqdm.write(text, file=self.stream)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._phase = None

"""SIGTERM / SIGINT / SIGHUP during training: finish the step, checkpoint, exit cleanly; a second
Ctrl-C aborts at once. Long loops inside a run (a sample grid, an online evaluation) check the flag at
every sampler step (``StopSignals.checked``) and end with ``StopRequested``."""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional


IGNORE_SIGINT = False  # a convergence-study worker: Ctrl-C is its parent's to handle (study/execute.py)


class StopRequested(Exception):
    """A stop signal arrived during a long loop that is not a training step (sampling, evaluation)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StopSignals:
    """Installs the handlers on ``__enter__`` (main thread only) and restores the old ones on exit;
    ``signum`` is the first signal received (None if none)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, notify: Optional[Callable[[str], None]] = None):
        self.signum = None
        self.notify = notify
        self._old = {}

    def _handler(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        if self.notify:
            self.notify(f"signal {signal.Signals(signum).name}: finishing this step, then checkpoint and exit "
                        "(Ctrl-C again to abort)")

    def checked(self, iterable):
        """``iterable``, ending with ``StopRequested`` before the next item once a stop signal arrived."""
        for item in iterable:
            if self.signum is not None:
                raise StopRequested(self.signum)
            yield item

    def stoppable(self, world: int):
        """What wraps a long loop's steps (sampling): one process ends it at a stop signal
        (``StopRequested``); several ranks run it to the end (they share its collectives) and agree on
        the stop at the next sync point."""
        return self.checked if world == 1 else (lambda steps: steps)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if s == signal.SIGINT and IGNORE_SIGINT:
                    continue
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False

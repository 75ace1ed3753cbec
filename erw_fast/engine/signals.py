"""SIGTERM / SIGINT / SIGHUP during training: finish the step, checkpoint, exit cleanly; a second
Ctrl-C aborts at once."""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional


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

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False

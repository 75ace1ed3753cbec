"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<folder>/.lock``, which holds the
holder's pid and command. Used by ``train`` (the run folder), ``sample`` and ``evaluate`` (the folder
they write into) and the convergence study (its folder; each arm's run folder through ``train``).

- A second process is refused with one line naming the holder's pid.
- The kernel drops a flock when its process dies, so a ``.lock`` file left by a killed process (its
  pid no longer holding it) is taken over, with a note naming that pid.
- Released on exit (the file is removed); a lock is per process, so a forked worker never inherits
  the right to write.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no lock, as before
    fcntl = None

LOCK_NAME = ".lock"


class RunFolderBusyError(RuntimeError):
    """Another live process holds the folder's lock (the CLI prints it as one ``error:`` line)."""

    exit_code = 2


def _holder(text: str) -> str:
    """``"1234 train"`` -> ``"pid 1234, train"``."""
    parts = text.strip().split(maxsplit=1)
    if not parts:
        return "pid unknown"
    return f"pid {parts[0]}" + (f", {parts[1]}" if len(parts) > 1 else "")


def _read_holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _topmost_missing(folder: str) -> Optional[str]:
    """The outermost of ``folder`` and its parents that does not exist yet (None: it exists)."""
    path, missing = os.path.abspath(folder), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _remove_empty(folder: str, top: Optional[str]):
    """Remove ``folder`` and its parents up to ``top`` while they are empty (the ones a lock made)."""
    if top is None:
        return
    path = os.path.abspath(folder)
    while path.startswith(top):
        try:
            os.rmdir(path)
        except OSError:  # not empty (the command wrote its outputs), or gone
            return
        path = os.path.dirname(path)


class RunLock:
    """``with RunLock(folder, "train"):``; ``acquire(create=False)`` locks only a folder that exists
    already (call ``acquire()`` again once it may be created)."""

    def __init__(self, folder: str, what: str, notify: Optional[Callable[[str], None]] = None):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_NAME)
        self.notify = notify or (lambda m: print(m, file=sys.stderr))
        self.fd = None
        self.made = None  # the topmost folder that acquire() created (removed on release while empty)

    def acquire(self, create: bool = True) -> "RunLock":
        if fcntl is None or self.fd is not None or (not create and not os.path.isdir(self.folder)):
            return self
        self.made = _topmost_missing(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusyError(
                    f"{self.folder} is in use by another erw_fast process ({_holder(_read_holder(self.path))}): "
                    "one writer per run "
                    f"folder. Wait for it to finish or stop it, or use another folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder removed it as we locked: lock the new file
                same = False
            if same:
                break
            os.close(fd)
        stale = os.read(fd, 256).decode(errors="replace").strip()
        if stale:
            self.notify(f"note: {self.path} was left by a process that has ended ({_holder(stale)}; killed?): "
                        "taking it over")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {self.what}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)  # drops the flock
            self.fd = None
            _remove_empty(self.folder, self.made)  # a command refused before writing leaves no folder

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# What a training run owns in its folder: other commands never write these (they would replace the run's
# own grid, settings or log).
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")
RUN_OWN = ("samples.png", "samples", "config.json", "metrics.jsonl", "checkpoints", "tb", LOCK_NAME)


def is_run_folder(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS)


def check_not_run_file(path: str, flag: str, example: str = "sampled.npz"):
    """ValueError when writing ``path`` would replace a training run's own file (or write inside its
    ``samples/``, ``checkpoints/`` or ``tb/``); ``example``: a file name to suggest instead."""
    folder = os.path.dirname(path) or "."
    name, parent, sub = os.path.basename(path), os.path.dirname(folder), os.path.basename(folder)
    if is_run_folder(folder) and name in RUN_OWN:
        run = folder
    elif is_run_folder(parent or ".") and sub in RUN_OWN:
        run = parent or "."
    else:
        return
    own = name if run == folder else f"{sub}/ folder"
    raise ValueError(f"{flag}: writing {path} would replace the training run {run}'s own {own}; write elsewhere, e.g. "
                     f"{flag} {os.path.join(run, example)}, or into another folder")


def output_lock(outputs, what: str):
    """For a command writing the files ``outputs`` ((path or None, flag, example name) triples): refuse
    paths that cannot be written (``utils.cli.check_writable``) and a training run's own files, and lock
    the first output's folder while the command runs (a no-op without outputs)."""
    import contextlib

    from .cli import check_writable

    paths = [(p, flag, example) for p, flag, example in outputs if p]
    for p, flag, example in paths:
        check_writable(p, flag)  # before the lock makes the folder: one line naming the flag, not a traceback
        check_not_run_file(p, flag, example)
    if not paths:
        return contextlib.nullcontext()
    return RunLock(os.path.dirname(paths[0][0]) or ".", what)

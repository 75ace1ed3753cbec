"""One error style for every command line: expected errors print one line ``error: ...`` (naming
the flag, file or shape) and exit with status 2; a traceback only with ``--debug``.

Expected = bad input or environment: ``ValueError``, ``OSError`` (missing file, full or read-only
disk), ``ImportError`` (a missing extra) and every exception class defined in erw_fast. Anything
else is a bug and keeps its traceback.

Exit statuses (documented in docs/training.md): 0 done · 1 stopped on a non-finite loss · 2 bad
input or environment · 128+N stopped by signal N after writing a checkpoint (resumable) · 130
aborted by a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from typing import Callable, List, Optional, Tuple

EXIT_OK, EXIT_NONFINITE, EXIT_USAGE = 0, 1, 2


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def add_machine_flags(parser: argparse.ArgumentParser, jobs: int) -> None:
    """The studies' "the machine" flags: --jobs (worker processes, default ``jobs``) and --threads."""
    m = parser.add_argument_group("the machine")
    m.add_argument("--jobs", type=int, help=f"runs trained at once, in worker processes (default {jobs})")
    m.add_argument("--threads", type=int, help="CPU threads per run (default: cores // jobs)")


def preset_flags(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None):
    """(``--quick`` given?, the flags given (unset and false ones left out), argv without ``--debug``)
    of a study's command line: the studies build their settings from a preset and the given flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = vars(parser.parse_args(argv))
    a.pop("debug", None)
    quick = a.pop("quick")
    return quick, {k: v for k, v in a.items() if v is not None and v is not False}, [v for v in argv if v != "--debug"]


def int_list(text: str) -> Tuple[int, ...]:
    """argparse type of a comma-separated list of integers (``--seeds 0,1,2``)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def given_dests(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The destinations set on the command line ``argv`` (not left at their defaults): ``argv`` parsed a
    second time with every default suppressed. Call it after a normal parse, which reports bad flags."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, default in saved:
            a.default = default


def check_positive(**values) -> None:
    """ValueError ``--name must be an integer >= 1, got v`` for the first value (given by its flag's
    name, ``batch_size`` = ``--batch-size``) that is not; ``None`` means unset and passes."""
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")


def check_writable(path: str, flag: str, folder: bool = False) -> None:
    """ValueError naming ``flag`` unless ``path`` can be written (a file, or with ``folder`` a folder
    to write into), checked before any expensive work: its nearest existing folder must be a folder
    in which a file can be created (tried with a temporary file that is removed at once: this also
    catches read-only file systems, which permission bits do not show to root), and a file path
    must not be an existing folder."""
    target = os.path.abspath(path)
    if not folder and os.path.isdir(target):
        raise ValueError(f"{flag} {path}: is a folder; give a file path")
    if folder and os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{flag} {path}: is a file; give a folder")
    base = target if folder else os.path.dirname(target)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ValueError(f"{flag} {path}: {base} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".erw-write-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {base} ({(e.strerror or type(e).__name__).lower()})") from None


def is_expected(e: BaseException) -> bool:
    return isinstance(e, (ValueError, OSError, ImportError)) or type(e).__module__.startswith("erw_fast")


def describe(e: BaseException) -> str:
    """A one-line description; OSErrors name the path and say what happened in words."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {e.filename or 'the output'}"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
        return f"cannot write {e.filename}: {e.strerror.lower() if e.strerror else 'permission denied'}"
    if isinstance(e, FileNotFoundError) and e.filename and not str(e).startswith(("no ", "--")):
        return f"no such file or folder: {e.filename}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def run_cli(main: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None,
            exit_code: Optional[Callable[[object], int]] = None) -> int:
    """Call ``main(argv)``; turn expected errors into ``error: ...`` and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected / bug below
        if debug or not is_expected(e):
            raise
        code = getattr(e, "exit_code", EXIT_USAGE)
        print(f"error: {describe(e)}", file=sys.stderr)
        return code
    if exit_code is not None:
        return exit_code(result)
    return result if isinstance(result, int) else EXIT_OK

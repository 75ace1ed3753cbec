"""A section's budget share and the guarded runner: a section that raises is recorded failed, one that
runs out of its share records the parts it did not run."""
import time
import traceback

from . import common
from .common import LOCK, RESULTS, SECTIONS, STATE
from .device import CUDA


class Ctx:
    """What a running section knows about its time: ``left()``, ``over(part)`` (True once its share
    is spent; the part is recorded as not run), ``fail(msg)`` (a failed check) and ``not_run(part)``
    (a part left out for another reason, given in ``part``)."""

    def __init__(self, name, share_s):
        self.name, self.share_s, self.t0 = name, share_s, time.time()
        self.failures, self.cut, self.left_out = [], [], []

    def left(self):
        return self.share_s - (time.time() - self.t0)

    def over(self, part):
        if self.left() > 0:
            return False
        self.cut.append(part)
        return True

    def fail(self, msg):
        self.failures.append(msg)
        print(f"   FAIL {self.name}: {msg}", flush=True)

    def not_run(self, part):
        self.left_out.append(part)


def time_left():
    """Seconds the sections may still use (the hard bound minus the end margin)."""
    return common.ARGS.budget_s - common.END_MARGIN_S - (time.time() - common.T_START)


def _min_start_s(name):
    _, cuda_min, dry_min, _ = SECTIONS[name]
    return common.ARGS.min_s.get(name, cuda_min if CUDA else dry_min)


def _share_s(name):
    pending = [n for n in common.ARGS.selected if RESULTS["sections"][n]["status"] == "pending"]
    left = time_left()
    if pending[-1] == name:
        return left
    share = left * SECTIONS[name][0] / sum(SECTIONS[n][0] for n in pending)
    return min(left, max(share, _min_start_s(name)))


def _status(ctx, exc):
    def listing(parts):
        return ", ".join(parts[:4]) + (f" (+{len(parts) - 4} more)" if len(parts) > 4 else "")

    missing = ([f"not run, its {ctx.share_s:.0f} s share of the budget spent: {listing(ctx.cut)}"] if ctx.cut else []) + \
        ([f"not run: {listing(ctx.left_out)}"] if ctx.left_out else [])
    failed = ([repr(exc)[:300]] if exc is not None else []) + ctx.failures
    if failed:
        return "failed", "; ".join(failed + missing)[:700]
    if missing:
        return "incomplete", "; ".join(missing)[:700]
    return "ok", ""


def run_section(name, fn):
    s = RESULTS["sections"][name]
    left, need = time_left(), _min_start_s(name)
    if left < need:
        s.update(status="skipped", reason=f"time budget: {max(left, 0):.1f} s left of --budget-s "
                                          f"{common.ARGS.budget_s:g}, the section needs >= {need:.1f} s to start")
        print(f"== {name}: SKIPPED ({s['reason']})", flush=True)
        common.save()
        return
    ctx = Ctx(name, _share_s(name))
    print(f"== {name} (share {ctx.share_s:.0f} s of {left:.0f} s left) ...", flush=True)
    with LOCK:
        STATE["running"] = name
        s.update(t0=ctx.t0, share_s=round(ctx.share_s, 1))
    exc = None
    try:
        if name in common.ARGS.fail_section:
            raise RuntimeError(f"injected failure (--fail-section {name})")
        while name in common.ARGS.stall_section:  # until the watchdog ends the process
            time.sleep(0.1)
        fn(ctx)
    except Exception as e:  # record and continue with the next section
        exc = e
        RESULTS["errors"].append({"section": name, "error": repr(e), "traceback": traceback.format_exc()})
        print(f"!! {name} failed: {e!r}", flush=True)
    with LOCK:
        STATE["running"] = None
        status, reason = _status(ctx, exc)
        s.update(status=status, reason=reason, seconds=round(time.time() - ctx.t0, 1))
        s.pop("t0", None)
        if status != "ok":
            print(f"!! {name}: {status.upper()}: {reason}", flush=True)
        common.save()

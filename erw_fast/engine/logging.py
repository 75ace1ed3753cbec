"""What a run reports: ``metrics.jsonl`` (one JSON object per line), a TensorBoard mirror under
``<out>/tb`` when the ``tensorboard`` package is installed (``pip install 'erw_fast[tb]'``),
human-readable durations and FLOP counts, and the closing summary."""
from __future__ import annotations

import json
import os
import sys

_NOT_SCALARS = ("step", "phase_step")  # the x axis, and the step within the phase (a second x axis)


def tb_writer(logdir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        return SummaryWriter(logdir, flush_secs=10)
    except Exception:  # ImportError, or a broken/partial tensorboard install: metrics.jsonl only
        return None


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; mirrors them to TensorBoard when it is installed.

    TensorBoard tags are ``<phase>/<key>`` for the step records (``train/loss``, ``warmup/loss_align``,
    ``train/lambda``, ``train/img_per_s``, ...) and ``<event>/<key>`` for event records that carry a step
    (``samples/seconds``, ``samples/sample_accuracy``); the sample grid is the image ``samples/grid``.
    """

    def __init__(self, out: str, enabled: bool = True, notify=None):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.notify = notify or (lambda m: print(m, file=sys.stderr))
        self.tb = tb_writer(os.path.join(out, "tb")) if enabled else None

    def _tb(self, call):
        """A TensorBoard call; a failure (a full disk while its writer flushes, ...) turns TensorBoard off
        with one note, and the run goes on (metrics.jsonl keeps every record)."""
        if self.tb is None:
            return
        try:
            call(self.tb)
        except Exception as e:  # noqa: BLE001 - TensorBoard is a mirror; never stop training for it
            tb, self.tb = self.tb, None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.notify(f"note: TensorBoard writing failed ({type(e).__name__}: {first}); TensorBoard is off for the "
                        f"rest of this run, {self.path} keeps every record")
            try:
                tb.close()
            except Exception:  # noqa: BLE001 - the same failure again: nothing more to save
                pass

    def write(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and record.get("step") is not None:
            group = record.get("phase") or record.get("event") or "run"
            scalars = [(f"{group}/{k}", v) for k, v in record.items()
                       if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)]
            self._tb(lambda tb: [tb.add_scalar(tag, v, record["step"]) for tag, v in scalars])

    def image(self, tag: str, image, step: int):
        """An image at ``step`` to TensorBoard (nothing without it): uint8 (H, W) grey or (H, W, 3) RGB."""
        if not self.enabled or self.tb is None:
            return
        import numpy as np

        a = np.asarray(image)
        if a.ndim == 2:
            a = a[:, :, None]
        self._tb(lambda tb: (tb.add_image(tag, a, step, dataformats="HWC"), tb.flush()))

    def close(self):
        self._tb(lambda tb: tb.close())
        self.tb = None


def fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def human_flops(f: float) -> str:
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= div:
            return f"{f / div:.2f} {unit}"
    return f"{f:.0f} FLOP"


def summary_lines(cfg, result, state) -> str:
    """The closing summary of a finished run."""
    s = result.summary
    wc = state.warmup_cost or {}
    lines = [f"done: {cfg.method} {cfg.model} on {cfg.data}, {result.steps} steps in "
             f"{fmt_seconds(s.get('total_seconds', 0))}"]
    reused = (state.transfer or {}).get("reused_warmup")
    if wc:
        lines.append(f"  warmup : {wc.get('steps')} steps, {fmt_seconds(wc.get('seconds', 0))}, "
                     f"{human_flops(wc.get('flops_total') or 0)}")
    elif reused:
        cost = human_flops(reused["flops_total"]) if reused.get("flops_total") else "FLOPs unknown"
        lines.append(f"  warmup : reused from {reused['source']} ({reused['steps']} steps, {cost}; not charged to "
                     "this run)")
    if state.transfer:
        lines.append(f"  transfer: {state.transfer['num_keys']} tensors from step {state.transfer['from_step']}")
    last = s.get("last") or {}
    if cfg.steps == 0:  # a warmup-only run: no full-training step, so no full-training loss to report
        wl = s.get("warmup_last") or {}
        lines.append("  train  : none (a warmup-only run; --resume --steps N trains on)"
                     + (f"; final warmup align loss {wl['loss_align']:.4f}" if "loss_align" in wl else ""))
    elif "loss" in last:
        lines.append(f"  train  : {cfg.steps} steps, {fmt_seconds(s.get('train_seconds', 0))}, "
                     f"{human_flops(s.get('train_flops_total') or 0)}; final loss "
                     f"{last['loss']:.4f} (velocity {last['loss_velocity']:.4f}, align {last['loss_align']:.4f})")
    else:
        lines.append(f"  train  : {cfg.steps} steps, {fmt_seconds(s.get('train_seconds', 0))}, "
                     f"{human_flops(s.get('train_flops_total') or 0)}")
    if "sample_accuracy" in s:
        lines.append(f"  samples: {s['sample_accuracy'] * 100:.0f}% read as the requested digit by the digits "
                     "classifier")
    lines.append(f"  outputs: {result.checkpoint}, {result.samples_png}, {os.path.join(cfg.out, 'metrics.jsonl')}")
    return "\n".join(lines)

"""Small shared helpers of the engine's tests: a tiny digits run's config and its logged rows."""
import json
import os

from erw_fast.engine import TrainConfig


def tiny_cfg(tmp_path, name="run", **kw):
    """A tiny, quiet, seeded digits run in ``tmp_path/name`` (2 warmup + 3 steps unless ``kw`` says otherwise)."""
    base = dict(out=str(tmp_path / name), warmup_steps=2, steps=3, batch_size=8, log_every=1, sample_steps=2,
                samples_per_class=1, progress=False, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def log_rows(out, losses_only=False):
    """The rows of ``out/metrics.jsonl`` (only the rows that log a loss with ``losses_only``)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip() and (not losses_only or '"loss"' in line)]

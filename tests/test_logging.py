"""What a run logs: metrics.jsonl always; TensorBoard scalars and the sample grid image when the
tensorboard package is installed; jsonl only (and no error) when it is not."""
import glob
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from erw_fast.engine import TrainConfig, train
from erw_fast.engine.logging import MetricsLog
from erw_fast.utils.images import read_png

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")

SCALARS = ("loss", "loss_align", "loss_velocity", "lambda", "img_per_s", "grad_norm", "lr")


def tiny(out):
    return TrainConfig(out=str(out), warmup_steps=2, steps=3, batch_size=8, log_every=1, progress=False, threads=1,
                       samples_per_class=1, sample_steps=2)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def events(out):
    """The run's TensorBoard event files, read back: (scalars tag -> [(step, value)], images tag -> [event])."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    files = glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    assert files, f"no event file under {out}/tb"
    ea = ea_mod.EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}
    images = {t: ea.Images(t) for t in tags["images"]}
    return scalars, images


def test_tensorboard_holds_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    res = train(tiny(out))
    assert res.status == "finished"
    recs = records(str(out))
    steps = [r for r in recs if "loss" in r]
    assert {r["phase"] for r in steps} == {"warmup", "train"} and len(steps) == 5  # log_every=1
    scalars, images = events(str(out))
    for r in steps:
        for k in SCALARS:
            tag = f"{r['phase']}/{k}"
            got = dict(scalars[tag])
            assert got[r["step"]] == pytest.approx(r[k], rel=1e-6, abs=1e-7), (tag, r["step"])
    for tag in ("train/loss", "warmup/loss_align", "train/lambda", "train/img_per_s"):
        assert len(scalars[tag]) >= 2, tag
    assert [s for s, _ in scalars["warmup/loss"]] == [1, 2] and [s for s, _ in scalars["train/loss"]] == [3, 4, 5]
    assert "train/step" not in scalars and "train/phase_step" not in scalars
    sample = next(r for r in recs if r.get("event") == "samples")
    assert dict(scalars["samples/seconds"])[sample["step"]] == pytest.approx(sample["seconds"], rel=1e-6)
    # the sample grid: one image at the sampling step, the PNG's pixels (grey grid sent as RGB)
    (img,) = images["samples/grid"]
    assert img.step == sample["step"] == 5
    tb_pixels = np.array(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
    png = read_png(res.samples_png)
    assert (img.height, img.width) == png.shape[:2]
    assert np.array_equal(tb_pixels, np.repeat(png[:, :, None], 3, axis=2) if png.ndim == 2 else png)


def test_without_tensorboard_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(ImportError):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    out = tmp_path / "run"
    res = train(tiny(out))
    assert res.status == "finished" and os.path.exists(res.samples_png)
    assert not os.path.exists(out / "tb")
    recs = records(str(out))
    assert len([r for r in recs if "loss" in r]) == 5 and any(r.get("event") == "samples" for r in recs)


def test_metrics_log_unit(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    log = MetricsLog(str(tmp_path))
    assert log.tb is not None
    log.write({"phase": "train", "step": 7, "phase_step": 2, "loss": 0.5, "lambda": 0.25, "ok": True, "name": "x"})
    log.write({"event": "checkpoint", "path": "p", "steps": 7})  # no step: jsonl only
    log.write({"event": "samples", "step": 7, "seconds": 1.5, "path": None})
    log.image("samples/grid", np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, 7)
    log.image("rgb", np.zeros((2, 2, 3), np.uint8), 8)
    log.close()
    log.close()  # twice is fine
    assert len(records(str(tmp_path))) == 3
    scalars, images = events(str(tmp_path))
    assert scalars == {"train/loss": [(7, 0.5)], "train/lambda": [(7, 0.25)], "samples/seconds": [(7, 1.5)]}
    assert sorted(images) == ["rgb", "samples/grid"] and images["samples/grid"][0].width == 4
    # disabled (non-main ranks): nothing at all
    quiet = MetricsLog(str(tmp_path / "rank1"), enabled=False)
    quiet.write({"phase": "train", "step": 1, "loss": 1.0})
    quiet.image("x", np.zeros((2, 2), np.uint8), 1)
    quiet.close()
    assert not os.path.exists(tmp_path / "rank1")
    # tensorboard missing: MetricsLog still writes the jsonl, image() is a no-op
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    os.makedirs(tmp_path / "plain")
    plain = MetricsLog(str(tmp_path / "plain"))
    plain.write({"phase": "train", "step": 1, "loss": torch.tensor(1.0).item()})
    plain.image("x", np.zeros((2, 2), np.uint8), 1)
    plain.close()
    assert plain.tb is None and records(str(tmp_path / "plain")) == [{"phase": "train", "step": 1, "loss": 1.0}]
    assert not os.path.exists(tmp_path / "plain" / "tb")

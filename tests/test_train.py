"""The training engine and CLI: short runs, checkpoints, resume exactness, NaN stop, bad inputs."""
import json
import math
import os
import signal

import pytest
import torch

from erw_fast.engine import NonFiniteLossError, RunFolderError, TrainConfig, resolve_config, train
from erw_fast.method import objective as objective_mod
from erw_fast.train import build_parser, config_from_args, main

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def cfg(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), warmup_steps=3, steps=4, batch_size=8, log_every=1, sample_steps=2,
                samples_per_class=1, progress=False, seed=3,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out):
    """step -> (loss, align, velocity) from the log (the last entry wins if a step was logged twice)."""
    return {r["step"]: (r["loss"], r["loss_align"], r["loss_velocity"]) for r in records(out) if "loss" in r}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", ["erw", "repa", "vanilla"])
def test_short_run_each_method(tmp_path, method):
    res = train(cfg(tmp_path, method=method))
    assert res.status == "finished"
    total = 7 if method == "erw" else 4
    assert res.steps == total
    ck = load(res.checkpoint)
    assert set(ck) >= {"model", "ema", "opt", "args", "steps", "phase", "transfer"}
    assert type(ck["args"]) is dict and ck["args"]["method"] == method and ck["steps"] == total
    assert os.path.basename(res.checkpoint) == f"{total:07d}.pt"
    with open(res.samples_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    recs = records(res.out)
    events = {r.get("event") for r in recs}
    assert "samples" in events and "checkpoint" in events
    losses = step_losses(res.out)
    assert sorted(losses) == list(range(1, total + 1))
    if method == "erw":
        tr = ck["transfer"]
        assert tr["from_step"] == 3 and tr["num_keys"] == len(tr["keys"]) > 0
        assert any(k.startswith("blocks.1.") for k in tr["keys"]) and not any(k.startswith("blocks.2.") for k in tr["keys"])
        assert "transfer" in events and "warmup_cost" in events
        wc = next(r for r in recs if r.get("event") == "warmup_cost")
        assert wc["steps"] == 3 and wc["seconds"] > 0 and wc["flops_per_step"] > 0
        # warmup steps log the alignment loss only; phase 2 logs both
        assert all(losses[s][2] == 0.0 and losses[s][0] == losses[s][1] for s in (1, 2, 3))
        assert os.path.exists(os.path.join(res.out, "checkpoints", "0000003.pt"))
    if method == "vanilla":
        assert not any(k.startswith("projectors") for k in ck["model"])
        assert all(v[1] == 0.0 for v in losses.values())
    # the EMA checkpoint loads as a model through the public loader
    from erw_fast import load_checkpoint

    model = load_checkpoint(res.checkpoint)
    assert model.use_rope == (method == "erw") and model.depth == 4  # REPA's and SiT's recipes: no RoPE


def test_resume_is_exact(tmp_path):
    full = train(cfg(tmp_path, "full"))
    part = cfg(tmp_path, "part", stop_after=2)  # stop inside the warmup
    r1 = train(part)
    assert r1.status == "stopped" and r1.steps == 2
    r2 = train(cfg(tmp_path, "part", resume="auto", stop_after=5))  # through the transfer, stop in phase 2
    assert r2.status == "stopped" and r2.steps == 5
    r3 = train(cfg(tmp_path, "part", resume="auto"))
    assert r3.status == "finished" and r3.steps == 7
    assert step_losses(full.out) == step_losses(r3.out)
    a, b = load(full.checkpoint), load(r3.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert a["transfer"]["keys"] == b["transfer"]["keys"]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = cfg(tmp_path, method="repa", steps=8, ckpt_every=2, debug_nan_at_step=5)
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 6"):  # the 6th step (index 5)
        train(c)
    rows = [json.loads(line) for line in open(os.path.join(c.out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r.get("event") == "nonfinite"] == [6]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # the step numbering of the log
    ckpts = sorted(os.listdir(os.path.join(c.out, "checkpoints")))
    assert ckpts == ["0000002.pt", "0000004.pt"]
    ck = load(os.path.join(c.out, "checkpoints", "0000004.pt"))
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_sigterm_checkpoints_and_exits(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = objective_mod.velocity_loss

    def fake(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # the FLOP count makes call 1; this is training step 2
            signal.raise_signal(signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(objective_mod, "velocity_loss", fake)
    res = train(cfg(tmp_path, method="vanilla", steps=6))
    assert res.status == "interrupted" and res.steps == 2
    assert load(res.checkpoint)["steps"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_ckpt_at_writes_checkpoints_at_the_listed_total_steps(tmp_path):
    c = cfg(tmp_path, ckpt_at=(2, 5, 6))  # 2 lies in the warmup (3 steps), 5 and 6 in phase 2
    train(c)
    names = sorted(os.listdir(os.path.join(c.out, "checkpoints")))
    assert names == [f"{k:07d}.pt" for k in (2, 3, 5, 6, 7)]  # + the transfer (3) and the final (7) one
    assert load(os.path.join(c.out, "checkpoints", "0000005.pt"))["phase_step"] == 2
    assert config_from_args(build_parser().parse_args(["--ckpt-at", "30,10"])).ckpt_at == (30, 10)
    assert resolve_config(TrainConfig(ckpt_at=(30, 10, 10))).ckpt_at == (10, 30)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--ckpt-at", "10,x"])
    with pytest.raises(ValueError, match="ckpt-at"):
        resolve_config(TrainConfig(ckpt_at=(0,)))


def test_rope_and_qknorm_same_in_both_phases(tmp_path):
    res = train(cfg(tmp_path, rope=False, qk_norm=True, warmup_steps=1, steps=1))
    tr = load(res.checkpoint)["transfer"]
    for key in ("use_rope", "qk_norm"):
        assert tr["warm_model_config"][key] == tr["full_model_config"][key]
    assert tr["full_model_config"]["use_rope"] is False and tr["full_model_config"]["qk_norm"] is True
    assert any(".attn.q_norm." in k for k in tr["keys"])
    res2 = train(cfg(tmp_path, "default", warmup_steps=1, steps=1))
    tr2 = load(res2.checkpoint)["transfer"]
    assert tr2["warm_model_config"]["use_rope"] is True and tr2["full_model_config"]["use_rope"] is True


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def test_bad_method_and_model(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        resolve_config(cfg(tmp_path, method="rpa"))
    with pytest.raises(ValueError, match="unknown model"):
        resolve_config(cfg(tmp_path, model="SiT-Q/2"))


def test_bad_depths(tmp_path):
    with pytest.raises(ValueError, match="encoder-depth 9 is outside"):
        resolve_config(cfg(tmp_path, encoder_depth=9))
    with pytest.raises(ValueError, match="below --l2r-depth"):
        resolve_config(cfg(tmp_path, l2r_depth=3, encoder_depth=2))
    # REPA has no warmup region: only the depth range applies
    resolve_config(cfg(tmp_path, method="repa", l2r_depth=3, encoder_depth=2))


def test_encoder_grid_mismatch(tmp_path):
    c = cfg(tmp_path, model="SiT-D/4")
    with pytest.raises(ValueError, match="8x8 = 64 tokens.*16 patch tokens"):
        train(c)
    assert not os.path.exists(c.out)  # checked before anything is written


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        train(cfg(tmp_path, resume=str(bad)))
    with pytest.raises(FileNotFoundError):
        train(cfg(tmp_path, resume=str(tmp_path / "missing.pt")))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an erw_fast training checkpoint"):
        train(cfg(tmp_path, resume=str(tmp_path / "other.pt")))


def test_refuses_folder_with_another_run(tmp_path):
    c = cfg(tmp_path, method="vanilla", steps=1)
    train(c)
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(c)
    assert main(["--out", c.out, "--method", "vanilla", "--no-progress"]) == 2


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--method", "--model", "--attn-backend", "--fused", "--no-fused", "--l2r-depth", "--encoder-depth",
                 "--warmup-steps", "--steps", "--batch-size", "--lr", "--lambda-schedule", "--lambda0",
                 "--half-life", "--align-loss", "--precision", "--ema-decay", "--seed", "--out", "--resume",
                 "--data", "--encoder", "--sample-every", "--ckpt-every", "--rope", "--no-rope", "--qk-norm",
                 "--compile"):
        assert flag in text, flag
    assert main(["--method", "nope", "--no-progress"]) == 2
    assert "unknown method" in capsys.readouterr().err
    c = config_from_args(build_parser().parse_args(["--no-fused", "--no-rope", "--resume"]))
    assert c.fused is False and c.rope is False and c.resume == "auto"
    c = config_from_args(build_parser().parse_args(["--fused", "--qk-norm", "--resume", "x.pt"]))
    assert c.fused is True and c.qk_norm is True and c.resume == "x.pt"
    assert config_from_args(build_parser().parse_args(["--fused", "torch"])).fused == "torch"
    assert config_from_args(build_parser().parse_args([])).fused is None


def test_compile_blocks_fullgraph(tmp_path):
    """--compile compiles each block with fullgraph=True (a graph break would raise)."""
    import torch._dynamo

    torch._dynamo.reset()
    res = train(cfg(tmp_path, method="vanilla", steps=2, compile=True, samples_per_class=1))
    assert res.status == "finished"
    ck = load(res.checkpoint)
    assert not any("_orig_mod" in k for k in ck["model"])


def test_png_writer_roundtrip(tmp_path):
    import numpy as np
    from PIL import Image

    from erw_fast.utils.images import image_grid, read_png, write_png

    imgs = torch.linspace(-1, 1, 6 * 4 * 4).reshape(6, 1, 4, 4)
    grid = image_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1) and grid.dtype == np.uint8
    assert grid[0].max() == 0 and grid[1, 1] == 0 and grid[-2, -2] == 255  # black padding, [-1, 1] -> 0..255
    assert np.array_equal(grid[1:5, 1:5], (((imgs[0, 0] + 1) / 2) * 255 + 0.5).to(torch.uint8).numpy())
    path = write_png(str(tmp_path / "g.png"), grid)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "g.png.tmp").exists()
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (grid.shape[1], grid.shape[0]))
    back = read_png(path)
    assert back.dtype == np.uint8 and np.array_equal(back, grid)
    rgb = image_grid(imgs.expand(6, 3, 4, 4), nrow=6, scale=2)
    assert rgb.shape == (1 * 9 + 1, 6 * 9 + 1, 3)
    assert np.array_equal(read_png(write_png(str(tmp_path / "sub" / "rgb.png"), rgb)), rgb)
    with pytest.raises(ValueError, match="uint8"):
        write_png(str(tmp_path / "f.png"), grid.astype(np.float32))


def test_default_config_is_the_digits_run():
    c = resolve_config(TrainConfig())
    assert (c.method, c.model, c.data, c.encoder) == ("erw", "SiT-D/2", "digits", "digits-ssl")  # label-free
    assert c.rope and not c.qk_norm and c.lambda_schedule == "halflife"
    assert 1 <= c.l2r_depth <= c.encoder_depth <= 4
    # scaled to a short run: the EMA and λ move within the run's length
    assert c.ema_decay <= 0.995 and c.half_life <= c.steps
    assert resolve_config(TrainConfig(method="repa")).lambda_schedule == "constant"
    assert resolve_config(TrainConfig(method="repa")).warmup_steps == 0
    xl = resolve_config(TrainConfig(model="SiT-XL/2"))
    assert (xl.l2r_depth, xl.encoder_depth, xl.lambda0) == (4, 14, 6.0)


def test_prefetcher_returns_fn_k_and_reads_ahead_in_a_thread():
    import threading
    import time as _time

    from erw_fast.engine.prefetch import Prefetcher, map_tensors

    calls = []

    def fn(k):
        calls.append((k, threading.current_thread().name))
        return (torch.full((2,), float(k)), None, [torch.tensor(k)])

    pf = Prefetcher(fn, depth=2)
    for k in (0, 1, 2, 7, 8, 3):  # in order, a jump ahead, and back
        x, none, (y,) = pf.get(k)
        assert none is None and float(x[0]) == k and int(y) == k
    deadline = _time.time() + 5
    while not any(k == 5 for k, _ in calls) and _time.time() < deadline:  # 3 asked: 4 and 5 run ahead
        _time.sleep(0.01)
    pf.close()
    assert {k for k, _ in calls} >= {0, 1, 2, 3, 4, 5, 7, 8}  # 9, 10 may be cancelled when 3 is asked
    assert all(name.startswith("erw_fast-prefetch") for _, name in calls)
    sync = Prefetcher(fn, depth=0)
    n = len(calls)
    assert float(sync.get(4)[0][0]) == 4 and calls[n:] == [(4, threading.current_thread().name)]
    doubled = map_tensors(lambda v: v * 2, (torch.ones(1), None, [torch.ones(1), "x"]))
    assert float(doubled[0]) == 2 and doubled[1] is None and float(doubled[2][0]) == 2 and doubled[2][1] == "x"
    with pytest.raises(ValueError, match="prefetch"):
        resolve_config(TrainConfig(prefetch=-1))


def test_digits_features_precomputed_once_match_the_online_encoder(tmp_path):
    """--features precomputed on the digits: the encoder runs once over every image before training (its
    FLOPs and seconds logged as the 'features' event), the steps read the table and skip the encoder; the
    targets and the losses are those of the online run (to float rounding)."""
    from erw_fast.data.digits import DigitsData
    from erw_fast.engine.build import load_encoders, measure_step_flops
    from erw_fast.utils.flops import count_flops

    c = resolve_config(cfg(tmp_path, features="precomputed"))
    data = DigitsData()
    (online,) = load_encoders(resolve_config(cfg(tmp_path)), data, "cpu")
    (pre,) = load_encoders(c, data, "cpu")
    assert pre.precomputed and pre.store.count == len(data) == 1797
    idx = torch.tensor([5, 1796, 0, 77])
    torch.testing.assert_close(pre.features(idx), online(data.images[idx]), rtol=1e-5, atol=1e-5)
    per_image = count_flops(lambda: online(data.images[:1]))
    assert pre.store.extraction["flops"] == pytest.approx(per_image * 1797)
    on, off = measure_step_flops(cfg(tmp_path)), measure_step_flops(cfg(tmp_path, features="precomputed"))
    assert off["features"] == pre.store.extraction["flops"] and "features" not in on
    assert on["train"] - off["train"] == pytest.approx(per_image * 8)  # a batch of 8 no longer runs the encoder
    a, b = train(cfg(tmp_path, "online")), train(cfg(tmp_path, "pre", features="precomputed"))
    la, lb = step_losses(a.out), step_losses(b.out)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-5), k
    ev = [r for r in records(b.out) if r.get("event") == "features"]
    assert len(ev) == 1 and ev[0]["flops"] == off["features"] and ev[0]["images"] == 1797 and ev[0]["seconds"] > 0
    assert b.summary["features_cost"] == [{k: ev[0][k] for k in ("encoder", "images", "flops", "seconds")}]
    assert not [r for r in records(a.out) if r.get("event") == "features"]


def test_study_model_keeps_the_paper_proportions():
    from erw_fast.models.sit import build_model

    c = resolve_config(TrainConfig(model="SiT-D8/2"))
    assert (c.l2r_depth, c.encoder_depth) == (1, 4)  # XL: 4 of 28 blocks warmed up, alignment at 14 of 28
    m = build_model("SiT-D8/2", input_size=16, in_channels=1, num_classes=10)
    assert (len(m.blocks), m.hidden_size, m.num_heads) == (8, 64, 2)

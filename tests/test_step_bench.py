"""The training-step benchmark compares like with like: for every step kind, the naive baseline
(bench/naive_baseline.py) and our step (bench/step_bench.py, the engine's Objective / make_optimizer /
EMA) compute the same loss on the same weights and batch, and one whole step (backward, clip,
AdamW, EMA) leaves the same weights.  fp32 CPU, no compile; a few seconds."""
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import naive_baseline as nb  # noqa: E402
import step_bench as sb  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP barriers on a busy box cost more than they give
    torch.manual_seed(0)
    cfg = dict(sb.SIZES["small"], batch=4)
    enc = sb.build_target_encoder(cfg["encoder"], "cpu", cfg["input_size"])
    yield cfg, enc, sb.make_batches(cfg, "cpu", n=1)[0]
    torch.set_num_threads(threads)


def _pair(cfg, enc, kind, fused=None):
    # fused="torch": our side goes through the erw_fast custom ops (torch backend) and the fused
    # projection+cosine loss, i.e. the code path CUDA runs, with PyTorch arithmetic.
    return sb.Pair(cfg, kind == "warmup", "cpu", enc, compile=False, ours_fused=fused,
                   ours_fused_align=fused if fused else None, seed=3)


@pytest.mark.parametrize("fused", [None, "torch"])
@pytest.mark.parametrize("kind", nb.KINDS)
def test_same_loss_and_update(setup, kind, fused):
    cfg, enc, batch = setup
    pair = _pair(cfg, enc, kind, fused)
    naive, ours = pair.steps(kind)
    # the sides really differ in implementation
    assert naive.opt.defaults["foreach"] is False and naive.opt.defaults["fused"] is False
    assert pair.naive_model.fused is False
    for a, b in zip(pair.naive_model.parameters(), pair.ours_model.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        ln, lo = naive.loss(batch), ours.loss(batch)
    assert torch.isfinite(ln) and ln.abs() > 0
    torch.testing.assert_close(lo, ln, rtol=1e-5, atol=1e-6)
    sn, so = naive(batch), ours(batch)
    torch.testing.assert_close(so, sn, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(pair.naive_model.named_parameters(), pair.ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{kind}: {name}: {m}")
    for a, b in zip(pair.naive_ema.parameters(), pair.ours_ema.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_kinds_differ(setup):
    """full and repa differ only by λ; vanilla has no alignment term; warmup is alignment only."""
    cfg, enc, batch = setup
    assert sb.step_lambda("full", cfg) < sb.step_lambda("repa", cfg) == cfg["lambda0"]
    pair = _pair(cfg, enc, "full")
    with torch.no_grad():
        full, repa, van = (pair.steps(k)[0].loss(batch) for k in ("full", "repa", "vanilla"))
    lf, lr = sb.step_lambda("full", cfg), sb.step_lambda("repa", cfg)
    align = (repa - van) / lr  # the same alignment term, weighted by each kind's λ
    assert -1 <= align <= 1 and align != 0
    torch.testing.assert_close((full - van) / lf, align, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        pair.steps("warmup")


def test_interleaved_and_summary(setup):
    cfg, enc, batch = setup
    pair = _pair(cfg, enc, "full")
    naive, ours = pair.steps("vanilla")
    tn, to = sb.interleaved(naive, ours, [batch], "cpu", 2)
    row = sb.summarise("small", "vanilla", cfg["batch"], tn, to)
    assert row["ratio"] > 0 and row["naive_img_s"] > 0 and row["naive_peak_mem_gib"] is None
    assert "| small | vanilla |" in sb.markdown_table([row])


def test_ours_is_the_engines_train_step(setup, monkeypatch):
    """The benchmark's "ours" side times ``erw_fast.engine.Trainer.train_step`` itself (not a copy)."""
    from erw_fast.engine import Trainer

    cfg, enc, batch = setup
    pair = _pair(cfg, enc, "full")
    _, ours = pair.steps("repa")
    assert isinstance(ours.trainer, Trainer)
    calls = []
    real = Trainer.train_step

    def spy(self, b, k, global_step=None):
        calls.append((type(b).__name__, k))
        return real(self, b, k, global_step)

    monkeypatch.setattr(Trainer, "train_step", spy)
    ours(batch)
    assert calls == [("Batch", sb.SCHEDULE_STEP)]


def test_phase_times_runs_for_both_sides(setup):
    cfg, enc, batch = setup
    pair = _pair(cfg, enc, "full")
    for side in pair.steps("full"):
        t = sb.phase_times(side, batch, "cpu", rounds=1)
        assert set(t) == {"encoder", "forward", "backward", "clip", "optimizer", "ema"}

"""Engine faults and claims (round 2): a damaged metrics.jsonl on resume, TensorBoard failing mid-run,
running out of memory at the first step, ``--fused triton`` on a CPU, a killed torchrun peer; the
loaded model is in eval mode; a run interrupted by a signal resumes bit-exactly."""
import os
import signal

import pytest
import torch

from erw_fast.engine import train
from erw_fast.engine.trainer import Trainer
from erw_fast.train import main
from run_helpers import log_rows as rows, tiny_cfg as cfg  # tests/ is on the path

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def test_resume_drops_malformed_log_rows_with_a_note(tmp_path, capsys):
    r = train(cfg(tmp_path, ckpt_every=1, stop_after=4))
    path = os.path.join(r.out, "metrics.jsonl")
    lines = open(path).read().splitlines()
    lines[3:3] = ["[1, 2]", '{"step": "seven", "loss": 1}', '{"step": 2.5}', "not json"]
    open(path, "w").write("\n".join(lines) + "\n")
    capsys.readouterr()
    res = train(cfg(tmp_path, resume="auto"))
    assert res.status == "finished"
    err = capsys.readouterr().err
    assert "dropped 4 line(s) that are not log records" in err and "4, 5, 6, 7" in err, err
    assert all(isinstance(x, dict) for x in rows(r.out))


class _FailingWriter:
    def __init__(self, fail_after):
        self.calls, self.fail_after, self.closed = 0, fail_after, False

    def add_scalar(self, *a):
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError(28, "No space left on device")

    def add_image(self, *a, **k):
        self.add_scalar()

    def flush(self):
        self.add_scalar()

    def close(self):
        self.closed = True
        raise OSError(28, "No space left on device")


def test_tensorboard_failing_mid_run_is_turned_off_with_one_note(tmp_path, monkeypatch, capsys):
    from erw_fast.engine import logging as elog

    writer = _FailingWriter(fail_after=20)
    monkeypatch.setattr(elog, "tb_writer", lambda logdir: writer)
    res = train(cfg(tmp_path))
    assert res.status == "finished" and writer.closed
    err = capsys.readouterr().err
    assert err.count("TensorBoard writing failed") == 1 and "No space left on device" in err
    steps = [x["step"] for x in rows(res.out) if "loss" in x]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                         "tried to allocate 123456789 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_at_the_first_step_names_the_batch_and_leaves_nothing(tmp_path, monkeypatch, capsys, error):
    def boom(self, *a, **k):
        raise error()

    monkeypatch.setattr(Trainer, "train_step", boom)
    out = tmp_path / "oom"
    assert main(["--out", str(out), "--method", "vanilla", "--encoder", "none", "--batch-size", "8", "--steps", "3",
                 "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory at step 1 (train) with --batch-size 8 (8 per process)"), err
    assert "--grad-accum N" in err[-1] and not out.exists()


def test_fused_triton_on_cpu_is_refused_before_the_folder(tmp_path, monkeypatch, capsys):
    from erw_fast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_interpreter_enabled", lambda op: False)
    out = tmp_path / "x"
    assert main(["--fused", "triton", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fused triton on cpu" in err[0] and "--fused torch" in err[0], err
    assert not out.exists()


def test_load_checkpoint_returns_an_eval_model_that_samples_the_same_twice(tmp_path):
    from erw_fast import load_checkpoint
    from erw_fast.models.sit import SiT_models
    from erw_fast.sampling import sample

    torch.manual_seed(0)
    model = SiT_models["SiT-D/2"](input_size=8, in_channels=1, num_classes=4, class_dropout_prob=0.5)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: give every weight a value
            p.normal_(0, 0.2)
    path = str(tmp_path / "m.pt")
    torch.save({"ema": model.state_dict(), "args": {"model_config": model.config()}}, path)
    loaded = load_checkpoint(path)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    noise, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    a = sample(loaded, noise, labels, sampler="ode-euler", steps=3)
    b = sample(loaded, noise, labels, sampler="ode-euler", steps=3)
    assert torch.equal(a, b)


def test_a_signal_interrupted_run_resumes_bit_exactly(tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) raised inside step 4 (phase 2): the run checkpoints and stops; --resume ends with the
    weights, EMA and losses of an uninterrupted run, bit for bit (same --threads)."""
    ref = train(cfg(tmp_path, "ref", steps=4, batch_size=8))
    real = Trainer.train_step
    seen = []

    def step(self, batch, k, global_step=None):
        seen.append(global_step)
        if global_step == 3 and len(seen) == 4:
            signal.raise_signal(signal.SIGINT)
        return real(self, batch, k, global_step=global_step)

    monkeypatch.setattr(Trainer, "train_step", step)
    part = train(cfg(tmp_path, "part", steps=4, batch_size=8))
    assert part.status == "interrupted" and part.signal == signal.SIGINT and part.steps == 4
    monkeypatch.setattr(Trainer, "train_step", real)
    done = train(cfg(tmp_path, "part", steps=4, batch_size=8, resume="auto"))
    assert done.status == "finished"
    a = torch.load(ref.checkpoint, weights_only=True)
    b = torch.load(done.checkpoint, weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    la = [(x["step"], x["loss"]) for x in rows(ref.out) if "loss" in x]
    lb = [(x["step"], x["loss"]) for x in rows(done.out) if "loss" in x]
    assert la == lb


def test_resuming_with_another_thread_count_says_it_is_no_longer_bit_exact(tmp_path, capsys):
    r = train(cfg(tmp_path, stop_after=3, threads=1))
    assert torch.load(r.checkpoint, weights_only=True)["num_threads"] == 1
    capsys.readouterr()
    train(cfg(tmp_path, resume="auto", threads=2))
    err = capsys.readouterr().err
    assert "trained on 1 CPU thread(s) so far and goes on with 2" in err and "--threads 1 keeps it exact" in err

"""``--warmup-from``: one warmup, many full runs. Reusing one of our warmups repeats the uninterrupted
run exactly; ERW's released warmup checkpoint (built here in its layout, random weights) transfers
into a RoPE model with a note; mismatches are refused before anything is written."""
import argparse
import json
import os

import pytest
import torch

from erw_fast.engine import TrainConfig, train
from erw_fast.train import main

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), steps=4, batch_size=8, log_every=1, sample_steps=2, samples_per_class=1,
                progress=False, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    return train(cfg(tmp, "base", warmup_steps=3))


def test_reusing_our_warmup_repeats_the_uninterrupted_run(tmp_path, base_run, capsys):
    warm_ckpt = os.path.join(base_run.out, "checkpoints", "0000003.pt")
    res = train(cfg(tmp_path, "reuse", warmup_from=warm_ckpt))
    full = [(r["step"], r["loss"]) for r in rows(base_run.out) if r.get("phase") == "train" and "loss" in r]
    again = [(r["step"], r["loss"]) for r in rows(res.out) if r.get("phase") == "train" and "loss" in r]
    assert again == full and [s for s, _ in again] == [4, 5, 6, 7]
    events = rows(res.out)
    assert not any(r.get("event") == "warmup_cost" for r in events)  # not charged to this run
    reused = next(r for r in events if r.get("event") == "warmup_reused")
    base_cost = next(r for r in rows(base_run.out) if r.get("event") == "warmup_cost")
    assert reused["source"] == warm_ckpt and reused["steps"] == 3 and reused["charged"] is False
    assert reused["flops_total"] == base_cost["flops_total"]
    transfer = next(r for r in events if r.get("event") == "transfer")
    assert transfer["reused_warmup"]["source"] == warm_ckpt
    assert "not charged to this run" in capsys.readouterr().err
    other = train(cfg(tmp_path, "reuse-seed", warmup_from=warm_ckpt, seed=4, lambda0=0.5))  # another full run
    assert other.status == "finished"


def _erw_warmup_file(tmp_path, qk_norm=True, projector_dim=256):
    """ERW's released warmup layout: blocks 0..L-1, no final layer, args as a Namespace, trained w/o RoPE."""
    from erw_fast.models import build_model

    torch.manual_seed(0)
    warm = build_model("SiT-D/2", input_size=16, in_channels=1, num_classes=10, depth=2, encoder_depth=2,
                       z_dims=[64], projector_dim=projector_dim, qk_norm=qk_norm, use_rope=False)
    sd = {k: v for k, v in warm.state_dict().items() if not k.startswith("final_layer.")}
    path = tmp_path / "0100000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "steps": 100_000,
                "args": argparse.Namespace(use_rope=False, qk_norm=qk_norm, l2r_depth=2, encoder_depth=2)}, path)
    return str(path), sd


def test_erw_release_warmup_transfers_into_a_rope_model(tmp_path, capsys):
    path, sd = _erw_warmup_file(tmp_path)
    res = train(cfg(tmp_path, "from-erw", warmup_from=path, qk_norm=True, steps=2, reuse_labels="positional"))
    assert res.status == "finished" and res.steps == 100_002
    assert "trained without RoPE" in capsys.readouterr().err
    first = torch.load(res.checkpoint, weights_only=True)
    assert first["transfer"]["reused_warmup"]["steps"] == 100_000


@pytest.mark.parametrize("flags,match", [
    (["--no-qk-norm", "--reuse-labels", "positional"], r"QK-norm: warmup on vs this run off \(--qk-norm\)"),
    (["--qk-norm"], r"label rows: the warmup and this run both have 10 classes but no names.*--reuse-labels "
                    r"positional"),
    (["--qk-norm", "--reuse-labels", "positional", "--model", "SiT-T/2"], r"width: warmup 96 vs this run 192 "
                                                                           r"\(--model\)"),
    (["--qk-norm", "--l2r-depth", "3"], r"--l2r-depth 3.*trained 2 blocks"),
    (["--qk-norm", "--warmup-steps", "5"], "leave out --warmup-steps"),
    (["--reuse-labels", "fresh", "--warmup-from", ""], "--reuse-labels .* needs --warmup-from"),
    (["--qk-norm", "--method", "repa"], "needs --method erw"),
    (["--qk-norm", "--steps", "0"], "nothing to train"),
])
def test_mismatches_are_refused_before_anything_is_written(tmp_path, capsys, flags, match):
    path, _ = _erw_warmup_file(tmp_path)
    out = tmp_path / "never"
    assert main(["--warmup-from", path, "--out", str(out), "--no-progress"] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not out.exists()


def test_a_full_checkpoint_is_refused_with_a_pointer_to_resume(tmp_path, base_run, capsys):
    assert main(["--warmup-from", base_run.checkpoint, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "full-training checkpoint" in err and f"--resume {base_run.checkpoint}" in err

"""``--resume`` refuses what it would ignore: a flag given with it either may change (the documented list)
or must equal the run's value, else one error names each flag with both values before anything is
written; a finished run says so and writes nothing; ``--steps`` below the run's step is refused; a
warmup-only run does not report a "final loss nan"; ``--ckpt-at`` beyond the run is refused; a
checkpoint whose ``args`` is damaged gets one line naming the file and key."""
import hashlib
import os
import shutil

import pytest
import torch

from erw_fast.engine import TrainConfig, train
from erw_fast.train import build_parser, config_from_args, main
from erw_fast.utils.cli import given_dests

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")

BASE = dict(warmup_steps=2, steps=3, batch_size=8, log_every=1, sample_steps=2, samples_per_class=1, progress=False,
            seed=3, threads=1)


def snapshot(folder):
    """Every file's content hash and mtime: a refused or finished call must change none of them."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "run")
    train(TrainConfig(out=out, **BASE))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(finished, dst)
    return dst


def cli(out, *flags):
    return main(["--resume", "--out", out, "--no-progress", "--threads", "1", *flags])


def test_given_dests_are_what_the_command_line_set():
    p = build_parser()
    assert given_dests(p, []) == set()
    assert given_dests(p, ["--no-fused", "--lr", "1e-3", "--resume"]) == {"fused", "lr", "resume"}
    c = config_from_args(p.parse_args(["--seed", "0"]), given_dests(p, ["--seed", "0"]))
    assert c.given == ("seed",) and "given" not in c.to_dict()


def test_changed_flags_are_refused_with_both_values_before_anything_is_written(run_copy, capsys):
    before = snapshot(run_copy)
    flags = ["--lr", "0.5", "--batch-size", "16", "--model", "SiT-T/2", "--method", "vanilla", "--seed", "9",
             "--steps", "5"]
    assert cli(run_copy, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume "), err
    for part in ("--lr 0.5 (the run has 0.001)", "--batch-size 16 (the run has 8)",
                 "--model SiT-T/2 (the run has SiT-D/2)", "--method vanilla (the run has erw)",
                 "--seed 9 (the run has 3)", "5 flag(s)"):
        assert part in err[0], (part, err[0])
    assert "--steps" not in err[0].split("differ")[1].split("Leave")[0]  # --steps may change
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flags,named", [
    (["--warmup-from", "x.pt"], "--warmup-from x.pt (the run has none)"),
    (["--no-rope"], "--rope False (the run has True)"),
    (["--lambda-schedule", "constant"], "--lambda-schedule constant (the run has halflife)"),
    (["--align-loss", "ntxent"], "--align-loss ntxent (the run has cosine)"),
    (["--qk-norm"], "--qk-norm True (the run has False)"),  # (--precision may change: issue 26)
    (["--warmup-steps", "7"], "--warmup-steps 7 (the run has 2)"),
    (["--class-dropout", "0.2"], "--class-dropout 0.2 (the run has 0.1)"),
])
def test_each_fixed_flag_is_checked(run_copy, capsys, flags, named):
    before = snapshot(run_copy)
    assert cli(run_copy, *flags, "--steps", "4") == 2
    err = capsys.readouterr().err
    assert named in err, err
    if "--warmup-from" in flags:
        assert "--warmup-from only starts a new run" in err
    assert snapshot(run_copy) == before


def test_the_runs_own_values_and_changeable_flags_are_accepted(run_copy):
    # the run's own values (as typed by a user: 1e-3 for 0.001) and flags that may change
    assert cli(run_copy, "--lr", "1e-3", "--batch-size", "8", "--seed", "3", "--model", "SiT-D/2", "--steps", "4",
               "--log-every", "2", "--keep-last", "1", "--sample-steps", "2", "--samples-per-class", "1") == 0
    ck = torch.load(os.path.join(run_copy, "checkpoints", "0000006.pt"), weights_only=True)
    assert ck["phase_step"] == 4 and ck["args"]["lr"] == 1e-3


def test_python_api_checks_fields_set_away_from_their_defaults(run_copy):
    with pytest.raises(ValueError, match=r"--lr 0.5 \(the run has 0.001\)"):
        train(TrainConfig(out=run_copy, resume="auto", lr=0.5, progress=False, threads=1))


def test_a_finished_run_says_so_and_writes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli(run_copy) == 0
    err = capsys.readouterr().err
    assert "is finished" in err and "nothing written" in err and "nan" not in err
    assert snapshot(run_copy) == before
    res = train(TrainConfig(out=run_copy, resume="auto", progress=False, threads=1))
    assert res.status == "finished" and res.steps == 5 and snapshot(run_copy) == before


def test_steps_below_the_runs_step_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli(run_copy, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "--steps 1: the run in" in err and "already at full-training step 3" in err and "nan" not in err
    assert snapshot(run_copy) == before


def test_warmup_only_run_reports_no_nan_and_its_resume_is_finished(tmp_path, capsys):
    out = str(tmp_path / "w")
    assert main(["--out", out, "--warmup-steps", "2", "--steps", "0", "--batch-size", "8", "--log-every", "1",
                 "--no-progress", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "nan" not in err and "warmup-only run" in err and "final warmup align loss" in err
    before = snapshot(out)
    assert cli(out) == 0
    err = capsys.readouterr().err
    assert "is finished" in err and "nan" not in err and snapshot(out) == before


def test_ckpt_at_beyond_the_run_is_refused_before_the_folder_exists(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--out", str(out), "--method", "vanilla", "--steps", "10", "--ckpt-at", "5,999",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--ckpt-at 999: beyond the run's last step 10" in err and not out.exists()


@pytest.mark.parametrize("args,named", [
    ([1, 2], "'args' is a list, not a dict"),
    ({"lr": "fast"}, "args['lr'] is 'fast' (str)"),
    ({"steps": 2.5}, "args['steps'] is 2.5 (float)"),
    ({"rope": "yes"}, "args['rope'] is 'yes' (str)"),
])
def test_damaged_args_in_a_checkpoint_name_the_file_and_key(run_copy, capsys, args, named):
    from erw_fast.engine.checkpoint import save_atomic

    path = os.path.join(run_copy, "checkpoints", "0000005.pt")
    ck = torch.load(path, weights_only=True)
    ck["args"] = args if isinstance(args, list) else {**ck["args"], **args}
    save_atomic(ck, path)
    before = snapshot(run_copy)
    assert cli(run_copy, "--steps", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and named in err[0], err
    assert snapshot(run_copy) == before


def test_precision_given_again_keeps_the_runs_fp8_recipe():
    """``--resume --precision fp8`` on a rowwise fp8 run is the run's own precision: its recipe stays
    (a new precision brings its own recipe; the same one changes nothing)."""
    from erw_fast.engine.checkpoint import resume_config

    args = TrainConfig(out="r", precision="fp8", fp8_recipe="rowwise").to_dict()
    same = resume_config(TrainConfig(out="r", resume="auto", precision="fp8", given=("out", "precision", "resume")),
                         args)
    assert same.fp8_recipe == "rowwise"
    other = resume_config(TrainConfig(out="r", resume="auto", precision="bf16", given=("out", "precision", "resume")),
                          args)
    assert (other.precision, other.fp8_recipe) == ("bf16", None)
    asked = resume_config(TrainConfig(out="r", resume="auto", precision="fp8", fp8_recipe="tensorwise",
                                      given=("fp8_recipe", "out", "precision", "resume")), args)
    assert asked.fp8_recipe == "tensorwise"

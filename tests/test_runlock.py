"""One writer per run folder (``erw_fast/utils/runlock.py``): a second process is refused with the
holder's pid; a lock left by a killed process is taken over with a note; ``train``, ``sample``,
``evaluate`` and the study lock their folders; ``sample``/``evaluate`` never replace a training run's
own files."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from erw_fast.engine import TrainConfig, train
from erw_fast.utils.runlock import RunFolderBusyError, RunLock

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
HOLD = ("import sys, time\nfrom erw_fast.utils.runlock import RunLock\nRunLock(sys.argv[1], 'train').acquire()\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")


def holder(folder):
    """A live process holding ``folder``'s lock."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lock") / "run")
    train(TrainConfig(out=out, method="vanilla", encoder="none", steps=2, batch_size=8, sample_steps=2,
                      samples_per_class=1, progress=False, threads=1))
    return out


def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "f"
    p = holder(folder)
    try:
        with pytest.raises(RunFolderBusyError, match=rf"in use by another erw_fast process \(pid {p.pid}, train\)"):
            RunLock(str(folder), "sample").acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    assert (folder / ".lock").exists()  # left by the killed process
    notes = []
    with RunLock(str(folder), "train", notify=notes.append):
        assert open(folder / ".lock").read().split()[0] == str(os.getpid())
    assert len(notes) == 1 and f"pid {p.pid}" in notes[0] and "taking it over" in notes[0]
    assert not (folder / ".lock").exists()  # released: removed
    with RunLock(str(folder), "train", notify=notes.append):  # a clean release leaves no note
        pass
    assert len(notes) == 1


def test_lock_is_not_created_for_a_folder_that_does_not_exist_yet(tmp_path):
    lock = RunLock(str(tmp_path / "new"), "train").acquire(create=False)
    assert not (tmp_path / "new").exists() and lock.fd is None


def test_train_into_a_folder_in_use_is_refused_with_the_pid(tmp_path, finished, capsys):
    from erw_fast.train import main

    for resume in ([], ["--resume"]):
        folder = tmp_path / f"busy{len(resume)}"
        p = holder(folder)
        try:
            before = files(folder)
            assert main(["--out", str(folder), "--method", "vanilla", "--encoder", "none", "--steps", "2",
                         "--no-progress", "--threads", "1", *resume]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"(pid {p.pid}, train)" in err[0] and "one writer per run folder" in err[0], err
            assert files(folder) == before
        finally:
            p.kill()
            p.wait(30)


def test_two_real_train_processes_on_one_folder(tmp_path):
    out = tmp_path / "two"
    args = [sys.executable, "-m", "erw_fast.train", "--out", str(out), "--method", "vanilla", "--encoder", "none",
            "--steps", "100000", "--batch-size", "8", "--log-every", "1", "--no-progress", "--threads", "1"]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").exists() and time.time() - t0 < 120:
            time.sleep(0.2)
        second = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
        assert second.returncode == 2 and f"(pid {first.pid}, train)" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert not (out / ".lock").exists()


def test_sample_never_replaces_a_runs_own_files(finished, capsys):
    from erw_fast.utils.cli import run_cli
    from erw_fast.sample import main as sample_main

    before = files(finished)
    for out in (finished, os.path.join(finished, "samples.npz"), os.path.join(finished, "samples", "x.npz")):
        assert run_cli(sample_main, ["--ckpt", finished, "--num-samples", "2", "--steps", "2", "--out", out,
                                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "would replace the training run" in err and "own samples" in err, err
    assert files(finished) == before
    ok = os.path.join(finished, "sampled.npz")
    assert run_cli(sample_main, ["--ckpt", finished, "--num-samples", "2", "--steps", "2", "--out", ok,
                                 "--no-progress"]) == 0
    assert os.path.exists(ok) and os.path.exists(ok[:-4] + ".png") and not os.path.exists(
        os.path.join(finished, ".lock"))
    os.remove(ok)
    os.remove(ok[:-4] + ".png")


def test_sample_and_evaluate_into_a_locked_folder_are_refused(tmp_path, finished, capsys):
    from erw_fast.evaluate import main as evaluate_main
    from erw_fast.sample import main as sample_main
    from erw_fast.utils.cli import run_cli

    folder = tmp_path / "held"
    p = holder(folder)
    try:
        assert run_cli(sample_main, ["--ckpt", finished, "--num-samples", "2", "--steps", "2", "--out",
                                     str(folder / "s.npz"), "--no-progress"]) == 2
        assert f"(pid {p.pid}, train)" in capsys.readouterr().err
        assert run_cli(evaluate_main, ["--ckpt", finished, "--num-samples", "2", "--steps", "2", "--json-out",
                                       str(folder / "e.json"), "--no-progress"]) == 2
        assert f"(pid {p.pid}, train)" in capsys.readouterr().err
        assert sorted(os.listdir(folder)) == [".lock"]
    finally:
        p.kill()
        p.wait(30)
    assert run_cli(evaluate_main, ["--ckpt", finished, "--num-samples", "2", "--steps", "2", "--json-out",
                                   os.path.join(finished, "metrics.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "would replace the training run" in err and "own metrics.jsonl" in err and "eval.json" in err


def test_a_refused_command_leaves_no_folder_made_for_its_lock(tmp_path):
    """``sample``/``evaluate`` lock their output folder before the checks that may refuse: a folder the
    lock made is removed again when the command is refused (nothing written)."""
    from erw_fast import evaluate, sample

    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "none.pt"), "--num-samples", "2", "--out",
                     str(tmp_path / "a" / "b" / "s.npz")])
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt"), "--json-out", str(tmp_path / "c" / "e.json")])
    assert sorted(os.listdir(tmp_path)) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    with RunLock(str(kept / "new"), "x"):
        (kept / "new" / "f").write_text("x")
    assert (kept / "new" / "f").exists()  # a folder with files stays
    with RunLock(str(kept), "x"):
        pass
    assert kept.is_dir()  # a folder that existed before stays, empty or not

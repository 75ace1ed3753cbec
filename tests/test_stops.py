"""Stops that stop: a signal during a sample grid or an online evaluation ends it at the next sampler
step (the run exits 128+N with its checkpoint); a huge ``--steps`` with ``--lambda-min`` starts at once;
the convergence study's workers die with it and Ctrl-C prints no worker traceback."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from erw_fast.engine import TrainConfig, train
from erw_fast.sampling import samplers

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), method="vanilla", encoder="none", steps=3, batch_size=8, log_every=1,
                sample_steps=50, samples_per_class=1, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def signal_at_sampler_step(monkeypatch):
    """SIGTERM raised inside the 3rd sampler step; ``calls`` counts the steps taken."""
    calls = []
    real = samplers._STEPS["sde"]

    def step(*a):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(*a)

    monkeypatch.setitem(samplers._STEPS, "sde", step)
    return calls


def test_a_signal_during_the_final_grid_stops_it(tmp_path, signal_at_sampler_step, capsys):
    res = train(cfg(tmp_path))
    assert res.status == "interrupted" and res.signal == signal.SIGTERM
    assert len(signal_at_sampler_step) == 3  # not one sampler step after the signal
    assert res.checkpoint.endswith("0000003.pt") and os.path.exists(res.checkpoint)
    assert not os.path.exists(os.path.join(res.out, "samples.png"))
    assert "stopped during the final sample grid (signal 15)" in capsys.readouterr().err
    from erw_fast.train import exit_status

    assert exit_status(res) == 128 + signal.SIGTERM


def test_a_signal_during_a_periodic_grid_stops_the_run_with_a_checkpoint(tmp_path, signal_at_sampler_step):
    res = train(cfg(tmp_path, sample_every=1, steps=4))
    assert res.status == "interrupted" and res.steps == 1 and len(signal_at_sampler_step) == 3
    assert res.checkpoint.endswith("0000001.pt") and os.path.exists(res.checkpoint)


def test_a_signal_during_an_online_evaluation_stops_the_run(tmp_path, signal_at_sampler_step):
    res = train(cfg(tmp_path, eval_every=2, steps=4, eval_samples=4, eval_batch=4))
    assert res.status == "interrupted" and res.steps == 2 and len(signal_at_sampler_step) == 3
    assert res.checkpoint.endswith("0000002.pt")


def test_huge_steps_with_lambda_min_starts_at_once(tmp_path):
    t0 = time.time()
    res = train(cfg(tmp_path, method="repa", encoder="digits-cnn", lambda_schedule="constant", lambda_min=0.5,
                    steps=10 ** 12, stop_after=2, ckpt_every=0))
    assert res.status == "stopped" and res.steps == 2 and time.time() - t0 < 120


def test_sigterm_during_the_final_grid_of_a_real_run(tmp_path):
    out = tmp_path / "real"
    p = subprocess.Popen([sys.executable, "-m", "erw_fast.train", "--method", "vanilla", "--encoder", "none",
                          "--steps", "2", "--batch-size", "8", "--sample-steps", "100000", "--samples-per-class", "1",
                          "--out", str(out), "--no-progress", "--threads", "1"], stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=REPO)
    try:
        t0 = time.time()
        while not (out / "checkpoints" / "0000002.pt").exists() and time.time() - t0 < 120:
            time.sleep(0.2)
        time.sleep(1.0)  # in the 100,000-step grid now
        t1 = time.time()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert time.time() - t1 < 30 and "stopped during the final sample grid" in err


WORKER = textwrap.dedent("""
    import os, sys, time
    def sleeper(cfg, plan, seed, flops, threads):
        with open(os.path.join(cfg.out, f"worker-{os.getpid()}"), "w"):
            pass
        time.sleep(300)
    def sleeper_reuse(cfg, p, name, seed):
        sleeper(cfg, p, seed, None, 1)
""")
PARENT = textwrap.dedent("""
    import sys, types
    sys.path.insert(0, sys.argv[1])
    import fakearm
    from erw_fast.study import execute
    from erw_fast.study.config import study_config
    from erw_fast.utils.cli import run_cli
    execute.run_arm = fakearm.sleeper            # pickled by reference: the workers import fakearm
    cfg = study_config(quick=True, jobs=2, out=sys.argv[2])
    arm = types.SimpleNamespace(name="a")
    jobs = [execute.Job(arm, None, s) for s in (0, 1)]
    sys.exit(run_cli(lambda argv: execute.run_jobs(cfg, jobs, {}), []))
""")
PARENT_REUSE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import fakearm
    from erw_fast.study import reuse
    from erw_fast.utils.cli import run_cli
    reuse._job = fakearm.sleeper_reuse           # pickled by reference: the workers import fakearm
    cfg = reuse.ReuseConfig(out=sys.argv[2], jobs=2)
    sys.exit(run_cli(lambda argv: reuse._pool(cfg, None, [("a", 0), ("a", 1)]), []))
""")


def _like_a_terminal():
    """Start the study as a shell in a terminal would: Ctrl-C at its default. A process started in the
    background of a non-interactive shell inherits SIGINT ignored (POSIX), and then Python installs no
    KeyboardInterrupt handler: Ctrl-C would rightly do nothing, and the SIGINT cases would hang."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_study(tmp_path, parent=PARENT):
    (tmp_path / "fakearm.py").write_text(WORKER)
    out = tmp_path / "study"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path), str(out)], stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=REPO, start_new_session=True, preexec_fn=_like_a_terminal)
    t0 = time.time()
    while len([f for f in os.listdir(out) if f.startswith("worker-")]) < 2 and time.time() - t0 < 120:
        time.sleep(0.2)
    pids = [int(f.split("-")[1]) for f in os.listdir(out) if f.startswith("worker-")]
    assert len(pids) == 2
    return p, pids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, timeout=30):
    t0 = time.time()
    while any(_alive(p) for p in pids) and time.time() - t0 < timeout:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker death signal is Linux's prctl")
@pytest.mark.parametrize("how,parent", [("SIGTERM", PARENT), ("SIGINT", PARENT), ("SIGKILL", PARENT),
                                        ("SIGTERM", PARENT_REUSE), ("SIGINT", PARENT_REUSE)])
def test_study_workers_die_with_their_parent(tmp_path, how, parent):
    """Both studies' pools (the convergence study's run_jobs, the reuse study's _pool)."""
    p, pids = _start_study(tmp_path, parent)
    try:
        if how == "SIGINT":  # Ctrl-C: the whole foreground process group gets it
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(getattr(signal, how))
        _, err = p.communicate(timeout=60)
        assert _gone(pids), f"orphaned workers after {how}"
    finally:
        for pid in [p.pid] + pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "Traceback" not in err, err
    if how != "SIGKILL":
        assert p.returncode == 128 + getattr(signal, how), err
        assert "stopped" in err

"""``--align-until K`` / ``--lambda-min``: from the stop on, λ = 0 and nothing that only the alignment
needs is computed — no target-encoder forward, no projector, no alignment loss, no feature reads —
so a step's FLOPs drop; the losses before the stop are those of a run without it."""
import os

import pytest
import torch

from erw_fast.engine import train
from erw_fast.method import AlignmentSchedule
from erw_fast.train import main
from run_helpers import log_rows as all_rows, tiny_cfg  # tests/ is on the path

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def cfg(tmp_path, name, **kw):
    return tiny_cfg(tmp_path, name, **{"steps": 5, **kw})


def log_rows(out):
    return all_rows(out, losses_only=True)


def test_schedule_stop_rules():
    s = AlignmentSchedule("halflife", 1.0, 2.0, until=3)
    assert [s.active(k) for k in range(5)] == [True, True, True, False, False]
    assert s(2) == 0.5 and s(3) == 0.0 and s.first_inactive(10) == 3
    m = AlignmentSchedule("halflife", 1.0, 1.0, minimum=0.2)  # 1, .5, .25, .125: off from k = 3
    assert m.first_inactive(10) == 3 and m(3) == 0.0
    assert AlignmentSchedule("constant", 1.0).first_inactive(10) is None
    with pytest.raises(ValueError, match="--align-until"):
        AlignmentSchedule(until=-1)


def _first_inactive_by_loop(s, steps):
    return next((k for k in range(steps) if not s.active(k)), None)


@pytest.mark.parametrize("kind", ["halflife", "exp", "constant", "linear-bisect"])
def test_first_inactive_closed_form_equals_the_loop_and_is_instant(kind):
    """Where --lambda-min stops the alignment: the schedule's inverse (bisection for a schedule registered
    without one) gives the loop's answer on small cases, and answers at once for 10**12 steps (the loop
    hung before the first step)."""
    import time

    from erw_fast.method.schedules import SCHEDULES, register_schedule

    if kind == "linear-bisect":
        register_schedule(kind)(lambda k, s: max(0.0, s.lambda0 * (1 - k / (4 * s.half_life))))
    try:
        for lam0 in (0.0, 0.3, 1.0, 4.0, 6.0):
            for h in (0.7, 1.0, 3.0, 7.5, 40.0):
                for m in (0.01, 0.25, 0.5, 1.0, 3.0):
                    for until in (None, 0, 5):
                        s = AlignmentSchedule(kind, lam0, h, minimum=m, until=until)
                        for steps in (0, 1, 6, 50, 400):
                            assert s.first_inactive(steps) == _first_inactive_by_loop(s, steps), (lam0, h, m, steps)
        t0 = time.time()
        assert AlignmentSchedule("constant", 1.0, minimum=0.5).first_inactive(10 ** 12) is None
        assert AlignmentSchedule("constant", 0.4, minimum=0.5).first_inactive(10 ** 12) == 0
        big = AlignmentSchedule(kind, 6.0, 10 ** 9, minimum=1e-3)
        k = big.first_inactive(10 ** 12)
        if kind == "constant":
            assert k is None
        else:
            assert k is not None and big.active(k - 1) and not big.active(k)
        assert time.time() - t0 < 1.0
    finally:
        SCHEDULES.pop("linear-bisect", None)


@pytest.mark.parametrize("method", ["erw", "repa"])
def test_align_until_stops_the_encoder_projector_and_loss(tmp_path, monkeypatch, method):
    from erw_fast.encoders.digits import DigitsEncoder

    calls = []
    real = DigitsEncoder.forward

    def counting(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(DigitsEncoder, "forward", counting)
    ref = train(cfg(tmp_path, "ref", method=method))
    n_ref = len(calls)
    calls.clear()
    stop = train(cfg(tmp_path, "stop", method=method, align_until=2))
    a, b = log_rows(ref.out), log_rows(stop.out)
    warm = 2 if method == "erw" else 0
    k_stop = warm + 2  # the log's step numbering: phase-2 steps 0, 1 align; 2, 3, 4 do not
    assert [r["loss"] for r in a if r["step"] <= k_stop] == [r["loss"] for r in b if r["step"] <= k_stop]
    after = [r for r in b if r["step"] > k_stop]
    assert after and all(r["lambda"] == 0.0 and r["loss_align"] == 0.0 and r["loss"] == r["loss_velocity"]
                         for r in after)
    # the encoder runs for the FLOP count of an aligned step, the warmup and the 2 aligned steps: the 3
    # steps after the stop (and the FLOP count of a stopped step) run no encoder
    assert len(calls) == n_ref - 3
    on = [r["flops_per_step"] for r in b if r["step"] <= k_stop and r["phase"] == "train"]
    off = [r["flops_per_step"] for r in after]
    assert len(set(on)) == 1 and len(set(off)) == 1 and off[0] < on[0]
    s = stop.summary
    assert s["train_flops_total"] == 2 * on[0] + 3 * off[0]


def test_lambda_min_stops_like_align_until(tmp_path):
    # halflife 1 step: λ = 1, .5, .25, ...; below 0.3 from phase step 2 on
    a = train(cfg(tmp_path, "a", method="erw", half_life=1.0, align_until=2))
    b = train(cfg(tmp_path, "b", method="erw", half_life=1.0, lambda_min=0.3))
    assert [r["loss"] for r in log_rows(a.out)] == [r["loss"] for r in log_rows(b.out)]


@pytest.mark.parametrize("flags,match", [
    (["--method", "vanilla", "--align-until", "3"], "does not have"),
    (["--align-until", "-1"], "--align-until"),
    (["--lambda-min", "-0.5"], "--lambda-min"),
])
def test_bad_stop_settings(tmp_path, capsys, flags, match):
    assert main(flags + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_ddp_ready_for_unused_projectors():
    """Under DDP a stopped alignment leaves the projectors without gradients: the wrapper is told."""
    from erw_fast.method import Objective

    sched = AlignmentSchedule("constant", 1.0, until=3)
    assert Objective(torch.nn.Linear(1, 1), None, True, sched).may_stop_aligning
    assert not Objective(torch.nn.Linear(1, 1), None, True, AlignmentSchedule("constant", 1.0)).may_stop_aligning


def test_flop_totals_survive_a_resume_past_the_stop_and_a_stop_at_zero(tmp_path):
    first = train(cfg(tmp_path, "r", method="repa", steps=5, align_until=2, stop_after=4))
    assert first.status == "stopped"
    res = train(cfg(tmp_path, "r", method="repa", steps=5, align_until=2, resume="auto"))
    assert res.summary["train_flops_total"] is not None and res.summary["train_flops_total"] > 0
    zero = train(cfg(tmp_path, "z", method="repa", steps=3, align_until=0))
    off = [r["flops_per_step"] for r in log_rows(zero.out)]
    assert zero.summary["train_flops_total"] == 3 * off[0]


def test_warmup_only_run_keeps_its_warmup_checkpoint(tmp_path):
    res = train(cfg(tmp_path, "w", steps=0, warmup_steps=3))
    ck = torch.load(os.path.join(res.out, "checkpoints", "0000003.pt"), weights_only=True)
    assert ck["phase"] == "warmup" and res.steps == 3
    reuse = train(cfg(tmp_path, "reuse", warmup_from=os.path.join(res.out, "checkpoints", "0000003.pt"), steps=2,
                      warmup_steps=None))
    assert reuse.status == "finished"

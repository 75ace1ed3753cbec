"""The convergence study (erw_fast.convergence): equal-compute planning, the crossing/ratio arithmetic,
and one tiny end-to-end study (train, checkpoint at the planned steps, evaluate, write doc and plot)."""
import json
import os

import numpy as np
import pytest
import torch

from erw_fast import convergence as cli
from erw_fast.evaluation import convergence as cv

FLOPS = dict(vanilla=11.0e9, full=14.4e9, warmup=8.9e9)


def test_plan_gives_every_method_the_same_compute():
    budget, plans = cv.plan_runs(FLOPS, budget_steps=600, points=5, warmup_steps=200)
    assert budget == pytest.approx(600 * FLOPS["full"])
    assert plans["repa"].steps == 600 and plans["repa"].warmup_steps == 0
    assert plans["vanilla"].steps > 600  # cheaper steps, more of them
    for m, p in plans.items():
        spent = cv.compute_at(FLOPS, p, p.total_steps)
        _, ff = cv.step_flops_of(FLOPS, m)
        assert abs(spent - budget) <= ff / 2 + 1e-6, m  # equal within half a step
        assert p.eval_steps == sorted(p.eval_steps) and p.eval_steps[-1] == p.total_steps
        for k, q in zip(p.eval_steps, p.eval_fractions):  # each evaluation sits at its budget fraction
            assert abs(cv.compute_at(FLOPS, p, k) - q * budget) <= ff / 2 + 1e-6
    erw = plans["erw"]
    assert erw.warmup_steps == 200
    # 20% of the budget (0.2 * 600 * 14.4e9) lies inside the warmup (200 * 8.9e9): no evaluation there
    assert erw.eval_fractions == [0.4, 0.6, 0.8, 1.0]
    assert all(k > erw.warmup_steps for k in erw.eval_steps)
    assert len(plans["repa"].eval_steps) == 5
    # the control (ERW's λ without warmup) spends its budget exactly like REPA
    ctrl = plans["erw-nowarmup"]
    assert (ctrl.warmup_steps, ctrl.steps, ctrl.eval_steps) == (0, 600, plans["repa"].eval_steps)
    from erw_fast.method import get_method

    assert all(get_method(m) for m in cv.ALL_METHODS)  # every study arm is a recipe of the trainer


def test_plan_refuses_a_budget_smaller_than_the_warmup():
    with pytest.raises(ValueError, match="warmup"):
        cv.plan_runs(FLOPS, budget_steps=10, points=2, warmup_steps=200)
    with pytest.raises(ValueError, match="budget-steps"):
        cv.plan_runs(FLOPS, budget_steps=0, points=2, warmup_steps=2)


def test_crossing_interpolates_and_reports_bounds():
    xs, ys = [1.0, 2.0, 3.0], [10.0, 6.0, 2.0]
    assert cv.crossing(xs, ys, 8.0) == (pytest.approx(1.5), "interpolated")
    assert cv.crossing(xs, ys, 2.0) == (pytest.approx(3.0), "interpolated")
    assert cv.crossing(xs, ys, 12.0) == (1.0, "at_first")
    assert cv.crossing(xs, ys, 1.0) == (None, "not_reached")
    # not monotone: the first crossing counts
    assert cv.crossing([1, 2, 3, 4], [9, 4, 8, 1], 5.0)[0] == pytest.approx(1 + 4 / 5)
    with pytest.raises(ValueError):
        cv.crossing([1.0], [1.0, 2.0], 1.0)


def _rec(method, seed, flops, fid, seconds):
    return dict(method=method, seed=seed, step=int(flops), fraction=flops / 10, flops=flops, fid=fid,
                seconds=seconds, accuracy=0.5)


def test_compute_ratios_pair_seeds_and_use_the_target_runs_final_fid():
    budget = 10.0
    res = []
    for s, shift in ((0, 0.0), (1, 1.0)):
        res += [_rec("repa", s, f, fid, f * 2) for f, fid in ((5, 20 + shift), (10, 10 + shift))]
        res += [_rec("erw", s, f, fid, f * 2) for f, fid in ((4, 30), (6, 10 + shift), (10, 5))]
    rows = cv.compute_ratios(res, budget, [0, 1], "erw", "repa", "repa")
    assert [r["ratio"] for r in rows] == [pytest.approx(0.6), pytest.approx(0.6)]
    assert [r["target_fid"] for r in rows] == [10.0, 11.0]
    assert rows[0]["seconds_ratio"] == pytest.approx(12 / 20)
    text = cv.format_ratio(rows)
    assert "0.60 ± 0.00" in text and "seed 1: 0.60" in text
    # a seed that never gets there is reported, not averaged away
    res_bad = [r for r in res if not (r["method"] == "erw" and r["seed"] == 1)]
    res_bad += [_rec("erw", 1, f, 50.0, f) for f in (4, 6, 10)]
    rows = cv.compute_ratios(res_bad, budget, [0, 1], "erw", "repa", "repa")
    assert rows[1]["ratio"] is None and "not reached" in cv.format_ratio(rows)


def test_bad_flags_and_mismatched_settings_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--methods", "erw,dit"])
    assert cli.build_parser().parse_args(["--methods", "erw-nowarmup,repa"]).methods == ("repa", "erw-nowarmup")
    with pytest.raises(ValueError, match="subset"):
        cv.run_study(cv.StudyConfig(out=str(tmp_path), methods=("erw", "repa"), plot="", doc=""))
    # a folder made with other settings is not mixed with new ones (nothing is trained)
    out = tmp_path / "old"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps(cv.study_settings(cv.StudyConfig(num_samples=400), 200)))
    with pytest.raises(ValueError, match="num_samples: 400 there, 1000 now"):
        cv.run_study(cv.StudyConfig(out=str(out), num_samples=1000, warmup_steps=200, plot="", doc=""))


def test_tiny_study_end_to_end(tmp_path):
    pytest.importorskip("matplotlib", reason="the study's plot needs matplotlib (the test extra installs it)")
    import struct

    out, doc, plot = tmp_path / "runs", tmp_path / "conv.md", tmp_path / "conv.png"
    argv = ["--out", str(out), "--doc", str(doc), "--plot", str(plot), "--seeds", "0", "--budget-steps", "6",
            "--points", "2", "--warmup-steps", "2", "--num-samples", "12", "--sample-steps", "2", "--no-progress"]
    (out / "vanilla-seed0").mkdir(parents=True)  # a run killed before its first checkpoint is started over
    (out / "vanilla-seed0" / "config.json").write_text("{}")
    r = cli.main(argv)
    study, results = r["study"], r["results"]
    plans = study["plans"]
    assert {x["method"] for x in results} == {"vanilla", "repa", "erw"}
    for m, p in plans.items():  # every planned checkpoint exists and was evaluated once
        got = sorted(x["step"] for x in results if x["method"] == m)
        assert got == p["eval_steps"]
        for k in got:
            assert (out / f"{m}-seed0" / "checkpoints" / f"{k:07d}.pt").exists()
    for x in results:
        assert np.isfinite(x["fid"]) and x["fid"] > 0 and 0 <= x["accuracy"] <= 1 and x["seconds"] > 0
        assert x["flops"] <= study["budget"] * 1.2
    erw_final = [x for x in results if x["method"] == "erw"][-1]
    ck = torch.load(out / "erw-seed0" / "checkpoints" / f"{erw_final['step']:07d}.pt", weights_only=True)
    assert erw_final["seconds"] == pytest.approx(ck["phase_seconds"] + ck["warmup_cost"]["seconds"])
    assert ck["warmup_cost"]["seconds"] > 0
    assert erw_final["flops"] == pytest.approx(plans["erw"]["warmup_steps"] * study["flops"]["warmup"]
                                               + plans["erw"]["steps"] * study["flops"]["full"])
    text = doc.read_text()
    assert "python -m erw_fast.convergence --out" in text and "| REPA |" in text and plot.name in text
    head = plot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 400 and height > 200
    # hand-written notes survive a rerun; the rerun trains and evaluates nothing new
    doc.write_text(text.replace("_(no notes yet)_", "my diagnosis"))
    n_lines = len((out / "results.jsonl").read_text().splitlines())
    cli.main(argv + ["--methods", "erw-nowarmup"])  # a control added later joins the same report
    text = doc.read_text()
    assert "my diagnosis" in text and "| ERW λ, no warmup (control) |" in text
    assert len((out / "results.jsonl").read_text().splitlines()) == n_lines + len(plans["repa"]["eval_steps"])
    assert text.count("python -m erw_fast.convergence --out") == 2  # both commands are listed
    assert json.loads((out / "study.json").read_text())["budget"] == pytest.approx(study["budget"])


def test_report_goes_to_out_unless_docs_are_asked_for(tmp_path):
    out = str(tmp_path / "study")
    assert cv.report_paths(cv.StudyConfig(out=out)) == (os.path.join(out, "convergence.md"),
                                                         os.path.join(out, "convergence.png"))
    assert cv.report_paths(cv.StudyConfig(out=out, update_docs=True)) == (cv.DOCS_DOC, cv.DOCS_PLOT)
    assert cv.report_paths(cv.StudyConfig(out=out, doc="", plot="p.png", update_docs=True)) == ("", "p.png")


def test_probe_flops_counts_what_the_trainer_counts_without_training(tmp_path, monkeypatch):
    """The study's FLOP probe trains nothing (no run folder) and counts what a run logs as warmup_cost."""
    from erw_fast import engine

    def no_training(*a, **k):
        raise AssertionError("probe_flops must not train")

    monkeypatch.setattr(engine, "train", no_training)
    flops = cv.probe_flops()
    assert flops["vanilla"] < flops["full"] and 0 < flops["warmup"] < flops["full"]
    monkeypatch.undo()
    res = engine.train(engine.TrainConfig(out=str(tmp_path / "r"), warmup_steps=1, steps=1, progress=False,
                                          samples_per_class=1, sample_steps=1))
    assert res.summary["warmup_cost"]["flops_per_step"] == flops["warmup"]
    assert res.summary["train_flops_per_step"] == flops["full"]

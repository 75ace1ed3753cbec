"""The convergence study (erw_fast.convergence, erw_fast.study): equal-compute planning with the warmup,
the alignment stop and the feature extraction counted; the curve arithmetic; the settings; and the
``--quick`` preset end to end (every arm trains, is evaluated and reported; a rerun trains nothing)."""
import json
import os
import struct

import numpy as np
import pytest
import torch

from erw_fast import convergence as cli
from erw_fast.study import config as sc
from erw_fast.study import execute as ex
from erw_fast.study import plan as sp

FLOPS = dict(vanilla=11.6e9, full=12.4e9, warmup=2.3e9, unaligned=11.6e9, features=21.5e9)


def _plans(**kw):
    cfg = sc.study_config(**kw)
    return sp.plan_runs(FLOPS, cfg.budget_steps, cfg.points, sc.study_arms(cfg))


def test_every_arm_gets_the_same_compute_extraction_and_warmup_counted():
    budget, plans = _plans()
    assert budget == pytest.approx(400 * FLOPS["full"] + FLOPS["features"])
    assert list(plans) == ["vanilla", "repa", "repa-stop", "erw-w05", "erw-w10", "erw-w20", "erw-w40",
                           "erw-w10-stop", "erw-nowarmup"]
    assert plans["repa"].steps == 400 and plans["repa"].features_flops == FLOPS["features"]
    assert plans["vanilla"].features_flops == 0 and plans["vanilla"].steps > 400  # no features: it trains on
    for name, p in plans.items():
        step = max(per for _, per in sp.segments(FLOPS, p))
        assert abs(sp.compute_at(FLOPS, p, p.total_steps) - budget) <= step / 2 + 1, name
        assert p.eval_steps == sorted(p.eval_steps) and p.eval_steps[-1] == p.total_steps
        for k, q in zip(p.eval_steps, p.eval_fractions):  # each evaluation sits at its share of the budget
            assert abs(sp.compute_at(FLOPS, p, k) - q * budget) <= step / 2 + 1, (name, k)
            assert k > p.warmup_steps  # never inside a warmup
    for f in (0.05, 0.10, 0.20, 0.40):  # the warmup takes its share of the budget
        p = plans[f"erw-w{round(f * 100):02d}"]
        assert p.warmup_steps * FLOPS["warmup"] == pytest.approx(f * budget, abs=FLOPS["warmup"])
    assert plans["erw-w40"].eval_fractions == [0.5, 0.625, 0.75, 0.875, 1.0]  # 12.5-37.5% fall inside its warmup
    assert plans["repa"].eval_fractions == [i / 8 for i in range(1, 9)]  # 8 evaluations by default
    assert plans["erw-nowarmup"].steps == plans["repa"].steps


def test_the_alignment_stop_ends_at_its_share_and_buys_cheaper_steps():
    budget, plans = _plans()
    for name, warm in (("repa-stop", 0), ("erw-w10-stop", plans["erw-w10"].warmup_steps)):
        p = plans[name]
        assert p.warmup_steps == warm and p.align_until is not None
        at_stop = sp.compute_at(FLOPS, p, p.warmup_steps + p.align_until)
        assert at_stop == pytest.approx(0.5 * budget, abs=FLOPS["full"] / 2)
        twin = plans["repa" if name == "repa-stop" else "erw-w10"]
        assert p.steps > twin.steps  # after the stop a step costs less (no projector, no features)
    seg = sp.segments(FLOPS, plans["repa-stop"])
    assert [s[1] for s in seg] == [FLOPS["warmup"], FLOPS["full"], FLOPS["unaligned"]] and seg[0][0] == 0


def test_plan_and_settings_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="does not cover"):
        _plans(budget_steps=2, warmup_fractions=(0.99,))
    with pytest.raises(ValueError, match="budget-steps"):
        sp.plan_runs(FLOPS, 0, 2, sc.study_arms(sc.StudyConfig()))
    with pytest.raises(ValueError, match=r"--points must be >= 2 \(a curve needs two evaluations\), got 1"):
        sc.check_config(sc.study_config(points=1))
    with pytest.raises(ValueError, match="--encoder 'dinov2-vit-b'.*digits-ssl, digits-cnn"):
        sc.check_config(sc.study_config(encoder="dinov2-vit-b"))
    with pytest.raises(ValueError, match="--fid-targets"):
        sc.check_config(sc.study_config(fid_targets=(5.0, -1.0)))
    bad = [dict(arms=("erw", "dit")), dict(warmup_fractions=(0.1, 0.1)), dict(warmup_fractions=(1.5,)),
           dict(stop_fraction=1.0), dict(stop_warmup=0.6), dict(num_samples=1), dict(seeds=()), dict(jobs=0)]
    for kw in bad:
        with pytest.raises(ValueError):
            sc.check_config(sc.study_config(**kw))
    with pytest.raises(ValueError, match="unknown arm.*dit"):
        sc.check_config(sc.study_config(arms=("repa", "dit")))


def test_crossing_interpolates_and_reports_bounds():
    xs, ys = [1.0, 2.0, 3.0], [10.0, 6.0, 2.0]
    assert sp.crossing(xs, ys, 8.0) == (pytest.approx(1.5), "interpolated")
    assert sp.crossing(xs, ys, 2.0) == (pytest.approx(3.0), "interpolated")
    assert sp.crossing(xs, ys, 12.0) == (1.0, "at_first")
    assert sp.crossing(xs, ys, 1.0) == (None, "not_reached")
    assert sp.crossing([1, 2, 3, 4], [9, 4, 8, 1], 5.0)[0] == pytest.approx(1 + 4 / 5)  # the first crossing
    with pytest.raises(ValueError):
        sp.crossing([1.0], [1.0, 2.0], 1.0)


def _rec(arm, seed, flops, fid, seconds):
    return dict(arm=arm, seed=seed, step=int(flops), fraction=flops / 10, flops=flops, fid=fid, seconds=seconds,
                accuracy=0.5)


def test_compute_ratios_pair_seeds_and_name_seeds_that_never_get_there():
    res = []
    for s, shift in ((0, 0.0), (1, 1.0)):
        res += [_rec("repa", s, f, fid, f * 2) for f, fid in ((5, 20 + shift), (10, 10 + shift))]
        res += [_rec("erw-w10", s, f, fid, f * 2) for f, fid in ((4, 30), (6, 10 + shift), (10, 5))]
    rows = sp.compute_ratios(res, 10.0, [0, 1], "erw-w10", "repa")
    assert [r["ratio"] for r in rows] == [pytest.approx(0.6)] * 2 and [r["target_fid"] for r in rows] == [10.0, 11.0]
    assert rows[0]["seconds_ratio"] == pytest.approx(12 / 20)
    assert "0.60 ± 0.00" in sp.format_ratio(rows) and "seed 1: 0.60" in sp.format_ratio(rows)
    res = [r for r in res if not (r["arm"] == "erw-w10" and r["seed"] == 1)] + \
        [_rec("erw-w10", 1, f, 50.0, f) for f in (4, 6, 10)]
    rows = sp.compute_ratios(res, 10.0, [0, 1], "erw-w10", "repa")
    assert rows[1]["ratio"] is None and "not reached in 1 of 2 seeds" in sp.format_ratio(rows)


def test_fid_targets_rule_and_reach_never_extrapolates():
    # the rule: log-spaced shares between the best and the worst arm's final FID, blind to the arms' names
    t = sp.fid_targets({"a": 5.0, "b": 20.0, "c": 10.0})
    assert t == [14.2, 10.0, 7.08]  # 5 * 4^(1 - q) for q = 0.25, 0.5, 0.75, rounded up at the 3rd digit
    assert sp.fid_targets({"a": 41.81, "b": 41.86}) == [41.9]  # rounded up: never below the best final FID
    assert sp.fid_targets({"x": 5.0, "y": 20.0, "z": 10.0}) == t
    assert sp.fid_targets({"a": 5.0}, given=(3.0, 8.0, 3.0)) == [8.0, 3.0] and sp.fid_targets({}) == []
    res = []
    for s in (0, 1):
        res += [_rec("repa", s, f, fid, f * 2) for f, fid in ((2, 30), (5, 20), (10, 10))]
        res += [_rec("erw-w10", s, f, fid, f * 3) for f, fid in ((2, 30), (4, 10 + s), (10, 5))]
    repa = sp.reach_rows(res, 10.0, [0, 1], "repa", 10.0)
    erw = sp.reach_rows(res, 10.0, [0, 1], "erw-w10", 10.0)
    assert [r["ratio"] for r in repa] == [pytest.approx(1.0)] * 2 and repa[0]["seconds"] == pytest.approx(20)
    assert erw[0]["ratio"] == pytest.approx(0.4) and erw[1]["kind"] == "interpolated"
    rel = sp.relative_rows(erw, repa)
    assert rel[0]["ratio"] == pytest.approx(0.4) and "seed 0: 0.40" in sp.format_ratio(rel)
    low = sp.reach_rows(res, 10.0, [0, 1], "repa", 9.0)  # below REPA's last evaluation: never extrapolated
    assert [r["kind"] for r in low] == ["not_reached"] * 2 and sp.relative_rows(erw, low) == []
    assert "not reached in any of the 2 seeds" in sp.format_ratio(low)
    assert "seed 0: ≤ 0.20" in sp.format_ratio(sp.reach_rows(res, 10.0, [0, 1], "repa", 40.0))


def test_verdict_names_tau_ratio_warmup_and_fit():
    from erw_fast.study import report

    res = []
    for s in (0, 1):
        res += [_rec("repa", s, f, fid, f) for f, fid in ((5, 20.0), (10, 10.0))]
        res += [_rec("erw-w10", s, f, fid, f) for f, fid in ((5, 14.0), (10, 4.0))]
        res += [_rec("erw-w20", s, f, fid, f) for f, fid in ((5, 15.0), (10, 6.0))]
    for r in res:
        r["fraction"] = r["flops"] / 10
    study = dict(seeds=[0, 1], budget=10.0, present=["repa", "erw-w10", "erw-w20"], sweep=["erw-w10", "erw-w20"],
                 arms={"repa": dict(warmup=0.0), "erw-w10": dict(warmup=0.1), "erw-w20": dict(warmup=0.2)},
                 fid_targets=[15.0, 10.0, 5.0], encoder="digits-ssl", fd_key="fd_digits-ssl", fit_desc="x",
                 fits={"erw-w10": {"0": dict(cknna=0.5), "1": dict(cknna=0.7)}})
    v = report.verdict(res, study)
    assert v["arm"] == "erw-w10" and v["target"] == 10.0 and v["warmup"] == 0.1  # REPA never reaches 5
    assert v["line"] == ("on this data ERW (warmup 10%) reached FID 10 with 0.70 ± 0.00 (seed 0: 0.70; seed 1: 0.70) of "
                         "REPA's compute (warmup counted); best warmup share 10%; the target encoder's fit (CKNNA at "
                         "the aligned block after the warmup) 0.600 ± 0.141")
    study["present"].remove("repa")
    assert "REPA was not evaluated" in report.verdict(res, study)["line"]


def test_cli_presets_and_flags():
    assert cli.build_parser().parse_args([]).quick is False
    q = sc.study_config(quick=True)
    assert (q.budget_steps, q.seeds, q.out) == (sc.QUICK["budget_steps"], (0,), sc.QUICK["out"])
    c = sc.study_config(quick=True, budget_steps=12, cfg_scale=0.0)  # a given flag wins over the preset
    assert c.budget_steps == 12 and c.cfg_scale == 0.0 and c.num_samples == sc.QUICK["num_samples"]
    a = cli.build_parser().parse_args(["--warmup-fractions", "0.1,0.3", "--arms", "repa,erw-w10", "--seeds", "4"])
    assert a.warmup_fractions == (0.1, 0.3) and a.arms == ("repa", "erw-w10") and a.seeds == (4,)
    b = cli.build_parser().parse_args(["--encoder", "digits-cnn", "--points", "4", "--fid-targets", "10,7.5"])
    assert (b.encoder, b.points, b.fid_targets) == ("digits-cnn", 4, (10.0, 7.5))
    d = sc.study_config()
    assert (d.encoder, d.points, d.seeds, d.num_samples, d.sample_steps) == ("digits-ssl", 8, (0, 1, 2), 400, 25)
    assert sc.study_settings(sc.study_config(encoder="digits-cnn"))["encoder"] == "digits-cnn"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--warmup-fractions", "ten"])


def test_a_folder_made_with_other_settings_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "old"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps(sc.study_settings(sc.study_config(num_samples=400))))
    monkeypatch.setattr(ex, "run_jobs", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(ValueError, match="num_samples: 400 there, 1000 now"):
        cli.main(["--out", str(out), "--num-samples", "1000", "--budget-steps", "4", "--plot", "", "--doc", ""])


def test_plan_only_writes_nothing(tmp_path, capsys):
    out = tmp_path / "nothing"
    r = cli.main(["--plan", "--out", str(out)])
    assert not out.exists() and r["plans"]["repa"].steps == 400 and len(r["plans"]["repa"].eval_steps) == 8
    err = capsys.readouterr().err
    assert "erw-w40" in err and "target encoder digits-ssl; 8 evaluations per run" in err
    with pytest.raises(ValueError, match="--points must be >= 2"):
        cli.main(["--plan", "--points", "1", "--out", str(out)])
    assert not out.exists()


def test_probe_counts_what_the_trainer_logs(tmp_path):
    """The planner's FLOPs are the trainer's: warmup and full step, the stop, the one-off extraction."""
    from erw_fast.engine import train

    cfg = sc.study_config(quick=True)
    flops = ex.probe_flops(cfg)
    assert 0 < flops["warmup"] < 0.25 * flops["full"]  # the paper's proportion: a warmup step costs < 25%
    assert flops["unaligned"] < flops["full"] and flops["features"] > 0
    res = train(ex.train_config(cfg, "erw", out=str(tmp_path / "r"), warmup_steps=1, steps=2, align_until=1,
                                progress=False, samples_per_class=1, sample_steps=1, log_every=1))
    recs = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["flops"] for r in recs if r.get("event") == "features"] == [flops["features"]]
    assert res.summary["warmup_cost"]["flops_per_step"] == flops["warmup"]
    assert res.summary["train_flops_total"] == flops["full"] + flops["unaligned"]


def _png_size(path):
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_quick_study_end_to_end(tmp_path):
    """--quick: every arm trains (2 worker processes), each planned checkpoint is evaluated once, the report
    and plot are written; notes survive a rerun, which trains and evaluates nothing."""
    pytest.importorskip("matplotlib", reason="the study's plot needs matplotlib (the test extra installs it)")
    out, doc, plot = tmp_path / "runs", tmp_path / "conv.md", tmp_path / "conv.png"
    argv = ["--quick", "--out", str(out), "--doc", str(doc), "--plot", str(plot)]
    (out / "repa-seed0").mkdir(parents=True)  # a run killed before its first checkpoint is started over
    (out / "repa-seed0" / "config.json").write_text("{}")
    r = cli.main(argv)
    study, results, plans = r["study"], r["results"], r["study"]["plans"]
    assert set(study["present"]) == set(plans) == {a.name for a in sc.study_arms(sc.study_config(quick=True))}
    for name, p in plans.items():
        assert sorted(x["step"] for x in results if x["arm"] == name) == p["eval_steps"]
        for k in p["eval_steps"]:
            assert (out / f"{name}-seed0" / "checkpoints" / f"{k:07d}.pt").exists()
    for x in results:
        assert np.isfinite(x["fid"]) and x["fid"] > 0 and 0 <= x["accuracy"] <= 1 and x["seconds"] > 0
        assert np.isfinite(x["fd_digits-ssl"]) and x["fd_digits-ssl"] > 0
        plan = sp.RunPlan(**plans[x["arm"]])
        assert x["flops"] == pytest.approx(sp.compute_at(study["flops"], plan, x["step"]))
    erw = [x for x in results if x["arm"] == "erw-w20"][-1]
    ck = torch.load(out / "erw-w20-seed0" / "checkpoints" / f"{erw['step']:07d}.pt", weights_only=True)
    extraction = ex.extraction_seconds(str(out / "erw-w20-seed0"))
    assert extraction > 0 and ck["warmup_cost"]["steps"] == plans["erw-w20"]["warmup_steps"]
    assert erw["seconds"] == pytest.approx(ck["phase_seconds"] + ck["warmup_cost"]["seconds"] + extraction)
    stop = [json.loads(x) for x in open(out / "erw-w10-stop-seed0" / "metrics.jsonl")]
    after = [x for x in stop if "loss" in x and x["phase"] == "train" and x["phase_step"] > plans["erw-w10-stop"]["align_until"]]
    assert after and all(x["lambda"] == 0 and x["flops_per_step"] == study["flops"]["unaligned"] for x in after)
    text = doc.read_text()
    fits = study["fits"]
    assert set(fits) == {n for n, p in plans.items() if p["method"] == "erw" and p["warmup_steps"]}
    for name, per_seed in fits.items():
        assert per_seed["0"]["step"] == plans[name]["warmup_steps"] and -1 <= per_seed["0"]["cknna"] <= 1
        assert per_seed["0"]["encoder"] == "digits-ssl"
    assert study["fid_targets"] and study["fd_key"] == "fd_digits-ssl"
    for piece in ("python -m erw_fast.convergence --quick --out", "| REPA |", "| ERW, warmup 40% |",
                  "Compute-optimal warmup share", "alignment stops at 50%", plot.name, "**fd_digits-ssl",
                  "## Compute to reach fixed FID targets", "## Verdict", "on this data ERW (warmup",
                  "CKNNA after the warmup", "`digits-ssl`"):
        assert piece in text, piece
    assert _png_size(plot)[0] > 1500  # six panels: FID, FD, accuracy, the sweep
    doc.write_text(text.replace("_(no notes yet)_", "my diagnosis"))
    n = len((out / "results.jsonl").read_text().splitlines())
    again = cli.main(argv + ["--jobs", "1"])
    assert "my diagnosis" in doc.read_text() and len((out / "results.jsonl").read_text().splitlines()) == n
    assert [i["trained"] for i in again["study"]["invocations"]] == [len(plans), 0]
    assert os.path.exists(out / "settings.json") and (out / "study.json").exists()


def test_report_paths_and_update_docs(tmp_path):
    import erw_fast.study as st

    out = str(tmp_path / "study")
    assert st.report_paths(sc.study_config(out=out)) == (os.path.join(out, "convergence.md"),
                                                         os.path.join(out, "convergence.png"))
    doc, plot = st.report_paths(sc.study_config(out=out, update_docs=True))  # the checkout's docs, from anywhere
    assert doc == os.path.join(st.repository_root(), "docs", "convergence.md") and os.path.isabs(plot)
    assert st.report_paths(sc.study_config(out=out, doc="", plot="p.png", update_docs=True)) == ("", "p.png")
    with pytest.raises(ValueError, match="smoke-test numbers"):
        st.report_paths(sc.study_config(quick=True, update_docs=True))


def test_a_failed_run_is_named_and_the_call_is_logged(tmp_path, monkeypatch):
    """A run that fails stops the study with its arm and seed named (one line); the call still lands in
    invocations.jsonl; a finished run trained for another plan is refused, not reused."""
    out = tmp_path / "s"

    def boom(cfg, plan, seed, flops, threads):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ex, "run_arm", boom)
    argv = ["--quick", "--out", str(out), "--jobs", "1", "--arms", "repa", "--doc", "", "--plot", ""]
    with pytest.raises(ex.StudyError, match=r"repa seed 0 failed \(RuntimeError: disk on fire\)"):
        cli.main(argv)
    (inv,) = ex.read_jsonl(str(out / "invocations.jsonl"))
    assert inv["status"] == "failed" and inv["trained"] == 0
    cfg = sc.study_config(quick=True, out=str(out))
    plan = sp.RunPlan("repa", "repa", 0, 8, None, 0.0, [8], [1.0])
    (out / "repa-seed0").mkdir()
    (out / "repa-seed0" / "done.json").write_text(json.dumps({"steps": 9}))
    with pytest.raises(ex.StudyError, match="trained for 9 steps, but this plan gives repa 8"):
        ex.train_run(cfg, plan, 0, 1)


def test_finals_and_ratios_use_the_end_of_the_budget_only():
    from erw_fast.study import report

    res = [_rec("repa", 0, 5, 20.0, 1), dict(_rec("repa", 0, 10, 10.0, 2), fraction=1.0),
           _rec("erw-w10", 0, 5, 8.0, 1)]  # erw-w10's final evaluation is missing
    assert [r["fid"] for r in report.finals(res, "repa", [0])] == [10.0] and not report.finals(res, "erw-w10", [0])
    assert not sp.compute_ratios(res, 10.0, [0], "repa", "erw-w10")  # no final FID to reach: no row
    rows = sp.compute_ratios(res, 10.0, [0], "erw-w10", "repa", reference="vanilla")
    assert rows[0]["ratio"] == pytest.approx(0.5) and sp.format_ratio(rows, "seconds_ratio") == "n/a"


def test_a_folder_from_before_the_encoder_flag_is_the_label_trained_study(tmp_path, monkeypatch):
    """The first study's settings.json has no ``encoder``: it was digits-cnn, so --encoder digits-cnn
    --points 4 may add seeds there, and the new default is refused."""
    import erw_fast.study as st

    out = tmp_path / "old"
    out.mkdir()
    old = sc.study_settings(sc.study_config(encoder="digits-cnn", points=4))
    del old["encoder"]
    (out / "settings.json").write_text(json.dumps(old))
    st.check_settings(str(out), sc.study_settings(sc.study_config(encoder="digits-cnn", points=4)))
    with pytest.raises(ValueError, match="encoder: 'digits-cnn' there, 'digits-ssl' now"):
        st.check_settings(str(out), sc.study_settings(sc.study_config(points=4)))


# --------------------------------------------------------------------------------------------
# The study on an image folder (a generated one, a tiny random-weight DINOv2)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from test_imagefolder import make_folder

    return make_folder(tmp_path_factory.mktemp("shapes"), per_class=8)  # 24 images, 40 px (32 px after the crop)


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_quick_study_on_an_image_folder_end_to_end(tmp_path, small_folder, tiny_dinov2_dir, capsys):
    """--quick on a generated folder with a local DINOv2: the folder's preset (SiT-D8/4, a batch fitted to
    24 images, the encoder online), FID null without an Inception file and the speed figure on fd_dinov2-vit-b
    against the folder's images; the report says so; a rerun trains nothing."""
    pytest.importorskip("matplotlib", reason="the study's plot needs matplotlib (the test extra installs it)")
    out, doc = tmp_path / "runs", tmp_path / "conv.md"
    argv = ["--quick", "--data", f"imagefolder:{small_folder}", "--encoder", "dinov2-vit-b", "--encoder-path",
            tiny_dinov2_dir, "--arms", "vanilla,repa,erw-w20", "--out", str(out), "--doc", str(doc), "--plot", "",
            "--jobs", "1", "--threads", "1"]
    r = cli.main(argv)
    assert "note: the budget goes" not in capsys.readouterr().err  # 8 steps x 8 images / 24: no memorising note
    study, results = r["study"], r["results"]
    s = json.load(open(out / "settings.json"))
    assert (s["data"], s["model"], s["batch_size"], s["features"], s["fid_network"]) == \
        (f"imagefolder:{small_folder}", "SiT-D8/4", 8, "online", None)
    assert study["metric"] == study["fd_key"] == "fd_dinov2-vit-b" and set(study["present"]) == {"vanilla", "repa", "erw-w20"}
    assert results and all(x["fid"] is None and "accuracy" not in x and np.isfinite(x["fd_dinov2-vit-b"]) for x in results)
    assert study["fid_targets"] and -1 <= study["fits"]["erw-w20"]["0"]["cknna"] <= 1
    cfg = json.load(open(out / "repa-seed0" / "config.json"))
    assert cfg["data"] == f"imagefolder:{small_folder}" and cfg["encoder"] == "dinov2-vit-b" and cfg["batch_size"] == 8
    text = doc.read_text()
    for piece in ("**no FID**", "Compute to reach fixed fd_dinov2-vit-b targets", "## Verdict", "CLS token"):
        assert piece in text, piece
    again = cli.main(argv)
    assert [i["trained"] for i in again["study"]["invocations"]] == [3, 0]


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_study_bad_inputs_on_an_image_folder(tmp_path, small_folder, monkeypatch, tiny_dinov2_dir, capsys):
    """Each a one-line error before anything is written: a folder smaller than the batch, more samples than
    images, a digits encoder on other images, and a rerun into a folder made for the digits."""
    monkeypatch.setattr(ex, "run_jobs", lambda *a, **k: pytest.fail("nothing may train"))
    data = f"imagefolder:{small_folder}"
    out = tmp_path / "x"
    for extra, msg in ((["--batch-size", "64"], "24 images, fewer than the batch of 64"),
                       (["--num-samples", "400"], "more samples than the folder's 24 images"),
                       (["--encoder", "digits-ssl"], "read 16x16 greyscale digits")):
        with pytest.raises(ValueError, match=msg):
            cli.main(["--quick", "--data", data, "--out", str(out), "--plot", "", "--doc", ""] + extra)
        assert not out.exists()
    with pytest.raises(ValueError, match="--batch-size: the digits study"):
        sc.check_config(sc.study_config(batch_size=16))
    capsys.readouterr()
    cli.main(["--data", data, "--encoder-path", tiny_dinov2_dir, "--num-samples", "20", "--budget-steps", "1000",
              "--plan", "--out", str(out)])  # a note, not an error: 1000 steps x 8 images over 24 images
    assert "note: the budget goes 333 times through the folder's 24 images" in capsys.readouterr().err
    assert not out.exists()
    old = tmp_path / "digits-study"
    old.mkdir()
    (old / "settings.json").write_text(json.dumps(sc.study_settings(sc.study_config(quick=True))))
    with pytest.raises(ValueError, match="data: 'digits' there"):
        cli.main(["--quick", "--data", data, "--encoder-path", tiny_dinov2_dir, "--out", str(old), "--plot", "",
                  "--doc", ""])


# --------------------------------------------------------------------------------------------
# The study on latents (the generated folder preprocessed with a tiny random-weight VAE)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_latents(tmp_path_factory, small_folder, tiny_vae_dir):
    from erw_fast.data.prepare import preprocess

    out = tmp_path_factory.mktemp("latents")  # 24 latents 4x4x4 of 32-px images
    preprocess(images=small_folder, out=str(out), resolution=32, vae=tiny_vae_dir, batch_size=8, workers=0,
               progress=False, device="cpu")
    return str(out)


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_quick_study_on_latents_end_to_end(tmp_path, small_latents, tiny_dinov2_dir, capsys, monkeypatch):
    """--quick on a latent dataset: the latent preset (SiT-D8/2 for a 4x4 latent, a batch fitted to 24 latents,
    the encoder online on the stored images, the digits preset's lr/EMA/λ half-life) printed and used; every
    sample decoded with the dataset's VAE; fd_dinov2-vit-b against the stored images, FID null without
    Inception; the report says so."""
    pytest.importorskip("matplotlib", reason="the study's plot needs matplotlib (the test extra installs it)")
    decoded, latent_decoder = [], ex.latent_decoder

    def spy(data):
        decode = latent_decoder(data)
        return lambda z: decoded.append(tuple(z.shape)) or decode(z)

    monkeypatch.setattr(ex, "latent_decoder", spy)
    out, doc = tmp_path / "runs", tmp_path / "conv.md"
    argv = ["--quick", "--data", small_latents, "--encoder-path", tiny_dinov2_dir, "--arms", "vanilla,repa,erw-w20",
            "--out", str(out), "--doc", str(doc), "--plot", "", "--jobs", "1", "--threads", "1"]
    r = cli.main(argv)
    err = capsys.readouterr().err
    assert "latent preset: model SiT-D8/2 (2x2 tokens), batch 8, encoder features online" in err, err
    assert "lr 0.001, EMA 0.99, λ half-life 400 (the digits preset's)" in err and "FD reference: 24 of" in err
    study, results = r["study"], r["results"]
    s = json.load(open(out / "settings.json"))
    assert (s["data"], s["model"], s["batch_size"], s["features"], s["fid_network"], s["reference_images"]) == \
        (small_latents, "SiT-D8/2", 8, "online", None, 24)
    assert study["metric"] == "fd_dinov2-vit-b" and set(study["present"]) == {"vanilla", "repa", "erw-w20"}
    assert len(results) == 6 and all(x["fid"] is None and "accuracy" not in x and np.isfinite(x["fd_dinov2-vit-b"])
                                      for x in results)
    assert decoded == [(20, 4, 4, 4)] * 6  # every evaluation's 20 samples went through the VAE
    cfg = json.load(open(out / "erw-w20-seed0" / "config.json"))
    assert (cfg["data"], cfg["lr"], cfg["ema_decay"], cfg["half_life"]) == (small_latents, 1e-3, 0.99, 400)
    text = doc.read_text()
    for piece in ("**no FID**", "24 of the images the latent dataset stores", "Latent preset: lr 0.001"):
        assert piece in text, piece


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_latent_preset_reads_stored_features_and_charges_their_extraction(tmp_path, small_latents, tiny_dinov2_dir,
                                                                          capsys):
    """Target features stored by extract_features decide the features (precomputed) and the model's patch
    (their token grid: 1x1 → SiT-D8/4, where the 8x8 rule gives SiT-D8/2), and their extraction is charged:
    one image's encoder FLOPs times the dataset's 24."""
    import shutil

    from erw_fast.data.features import extract_features
    from erw_fast.encoders import build_encoder
    from erw_fast.utils.flops import count_flops

    data = str(tmp_path / "lat")
    shutil.copytree(small_latents, data)
    extract_features(data, "dinov2-vit-b", encoder_path=tiny_dinov2_dir, token_grid=1, progress=False, device="cpu")
    r = cli.main(["--quick", "--data", data, "--encoder-path", tiny_dinov2_dir, "--plan", "--out", str(tmp_path / "x")])
    assert "model SiT-D8/4 (1x1 tokens), batch 8, encoder features precomputed" in capsys.readouterr().err
    enc = build_encoder("dinov2-vit-b", path=tiny_dinov2_dir, token_grid=1)
    with torch.no_grad():
        one = count_flops(lambda: enc(sc.folder_data(data).encoder_images([0])))
    assert r["flops"]["features"] == pytest.approx(one * 24) and one > 0
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_study_bad_inputs_on_latents(tmp_path, small_latents, tiny_dinov2_dir, monkeypatch):
    """Each a one-line error before anything is written: fewer latents than the batch, more samples than
    reference images, no VAE to decode with, a digits subset, a missing folder, and a rerun into a folder
    made for other data."""
    import shutil

    monkeypatch.setattr(ex, "run_jobs", lambda *a, **k: pytest.fail("nothing may train"))
    out = tmp_path / "x"
    common = ["--quick", "--encoder-path", tiny_dinov2_dir, "--out", str(out), "--plot", "", "--doc", ""]
    novae = tmp_path / "novae"
    shutil.copytree(small_latents, novae)
    index = json.load(open(novae / "index.json"))
    (novae / "index.json").write_text(json.dumps({**index, "vae": str(tmp_path / "gone")}))
    for data, extra, msg in ((small_latents, ["--batch-size", "32"], "24 latents, fewer than the batch of 32"),
                             (small_latents, ["--num-samples", "30"], "more samples than the dataset's 24 images"),
                             (str(novae), [], "decodes the generated latents with the dataset's VAE, but the VAE "),
                             ("digits:0-4", [], "a subset of the digits is the reuse study's"),
                             (str(tmp_path / "none"), [], "unknown --data .*none.: use .digits.")):
        with pytest.raises(ValueError, match=msg):
            cli.main(common + ["--data", data] + extra)
        assert not out.exists()
    old = tmp_path / "digits-study"
    old.mkdir()
    (old / "settings.json").write_text(json.dumps(sc.study_settings(sc.study_config(quick=True))))
    with pytest.raises(ValueError, match="data: 'digits' there"):
        cli.main(common[:-6] + ["--data", small_latents, "--out", str(old), "--plot", "", "--doc", ""])
    assert os.listdir(old) == ["settings.json"]

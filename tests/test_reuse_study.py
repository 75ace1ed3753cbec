"""``python -m erw_fast.reuse_study --quick``: the foundation (digits 0–4) is warmed up, the four arms on
5–9 train at equal compute (the reused warmup counted as 0 and, separately, in full), each is scored
against the 5–9 digits, the report is written; a rerun reuses what is done, other settings are refused."""
import json
import os

import pytest

from erw_fast.reuse_study import main
from erw_fast.study.reuse import ARMS

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def test_quick_reuse_study_end_to_end(tmp_path):
    out = str(tmp_path / "study")
    res = main(["--quick", "--out", out, "--jobs", "1", "--threads", "1"])
    plan, results = res["plan"], res["results"]
    assert sorted(r["arm"] for r in results) == sorted(ARMS)
    steps = plan["steps"]
    assert steps["reuse"] == steps["repa"] == 6 and steps["reuse-charged"] < 6 and steps["erw"] < 6
    budget = plan["budget"]
    for a in ARMS:  # equal compute for the second task, within one step
        assert abs(plan["charged"][a] - budget) <= plan["flops"]["full"], a
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["first"] == "digits:0-4" and settings["second"] == "digits:5-9" and settings["encoder"]
    reuse = os.path.join(out, "reuse-seed0")
    tr = next(json.loads(line) for line in open(os.path.join(reuse, "metrics.jsonl")) if '"transfer"' in line)
    assert tr["label_rows"] == {"5": 5} and tr["reused_warmup"]["source"].endswith("foundation-seed0/checkpoints/"
                                                                                     f"{plan['warmup_steps']:07d}.pt")
    cfg = json.load(open(os.path.join(reuse, "config.json")))
    assert cfg["class_names"] == ["5", "6", "7", "8", "9"] and cfg["steps"] == 6
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] > 0 for r in results)
    doc = open(os.path.join(out, "reuse.md")).read()
    assert "REPA on 5–9" in doc and "python -m erw_fast.reuse_study --quick" in doc
    again = main(["--quick", "--out", out, "--jobs", "1", "--threads", "1"])  # nothing retrained or re-evaluated
    assert again["results"] == results
    with pytest.raises(ValueError, match="other settings"):
        main(["--quick", "--out", out, "--budget-steps", "7", "--jobs", "1"])
    from erw_fast.utils.runlock import RunLock

    held = RunLock(out, "another study").acquire()  # one study per folder: a second writer is refused
    try:
        with pytest.raises(Exception, match="in use by another erw_fast process"):
            main(["--quick", "--out", out, "--jobs", "1", "--threads", "1"])
    finally:
        held.release()

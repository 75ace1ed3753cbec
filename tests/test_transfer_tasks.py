"""A warmup reused on another task (``--warmup-from`` onto other data, classes, channels, sizes): the
plan (``erw_fast.method.transfer.plan_transfer``) carries what fits, starts the rest fresh and names
it, refuses what must match in one line before anything is written; digits → image folder and back at
a common 16-px grid; digit subsets (``digits:0-4``) keep their real digits as class names."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from erw_fast.data import DigitsData, digit_classes, load_train_data
from erw_fast.encoders.digits import DEFAULT_DIGITS_ENCODER as D
from erw_fast.engine import TrainConfig, resolve_config, train
from erw_fast.method.transfer import apply_transfer, encoder_family, plan_labels, plan_transfer
from erw_fast.models import build_model
from erw_fast.train import main

sys.path.insert(0, os.path.dirname(__file__))
from test_imagefolder import make_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")
TINY = dict(batch_size=8, log_every=1, sample_steps=2, samples_per_class=1, progress=False, threads=1, seed=1)


def sit(seed=0, **kw):
    base = dict(input_size=16, in_channels=1, num_classes=10, depth=4, encoder_depth=2, z_dims=[64], projector_dim=32)
    base.update(kw)
    torch.manual_seed(seed)
    return build_model("SiT-D/2", **base)


def warm_sd(**kw):
    """A warmup state dict (2 blocks, no final layer) whose tensors differ from any init."""
    m = sit(depth=2, encoder_depth=2, seed=7, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    return {k: v for k, v in m.state_dict().items() if not k.startswith("final_layer.")}


def rows_of(plan):
    return {r.group.split(" ")[0]: r for r in plan.rows if r.action != "own"}


# --------------------------------------------------------------------------------------------
# The plan, as a value
# --------------------------------------------------------------------------------------------
def test_label_rows_by_name_reordered_renamed_and_null():
    row, m = plan_labels(11, 4, 3, warm_classes=[str(d) for d in range(10)], classes=["7", "2", "cat"])
    assert m == {0: 7, 1: 2, 3: 10} and row.action == "partial"  # 'cat' fresh; the null row carried
    assert "fresh: 'cat'" in row.reason and "null row carried" in row.reason
    row, m = plan_labels(11, 11, 10, warm_classes=[str(d) for d in range(10)], classes=[str(d) for d in range(10)])
    assert m == {i: i for i in range(11)} and row.action == "carry"
    row, m = plan_labels(11, 11, 10, warm_classes=[str(d) for d in reversed(range(10))],
                         classes=[str(d) for d in range(10)])
    assert m == {**{i: 9 - i for i in range(10)}, 10: 10}  # reordered classes keep their own rows
    row, m = plan_labels(6, 6, 5, warm_classes=list("abcde"), classes=list("vwxyz"))
    assert m == {5: 5} and "fresh: 'v', 'w', 'x', 'y', 'z'" in row.reason  # renamed: nothing matches
    row, m = plan_labels(10, 11, 10, warm_classes=[str(d) for d in range(10)], classes=[str(d) for d in range(10)])
    assert 10 not in m and "null row fresh (the warmup has none)" in row.reason


def test_label_rows_without_names():
    row, m = plan_labels(11, 11, 10)  # equal counts, no names: refused
    assert row.action == "refuse" and "--reuse-labels positional" in row.reason and not m
    row, m = plan_labels(11, 11, 10, reuse="positional")
    assert m == {i: i for i in range(11)} and row.action == "carry"
    row, m = plan_labels(11, 11, 10, reuse="fresh")
    assert m == {10: 10} and row.action == "partial"
    row, m = plan_labels(11, 11, 10, same_data=True)  # the same --data: positions mean the same classes
    assert m == {i: i for i in range(11)}
    row, m = plan_labels(6, 4, 3)  # other counts, no names: every class row fresh, named
    assert m == {3: 5} and "the warmup had 5 classes, this run 3" in row.reason
    with pytest.raises(ValueError, match="--reuse-labels 'names'"):
        plan_labels(11, 11, 10, reuse="names")


def test_plan_carries_what_fits_and_names_the_rest():
    warm = warm_sd()
    model = sit(in_channels=3, input_size=32, num_classes=3, z_dims=[48], projector_dim=16)
    plan = plan_transfer(warm, model, warm_classes=[str(d) for d in range(10)], classes=["1", "3", "x"],
                         warm_encoder="dinov2-vit-b", encoder="dinov2-vit-s")
    r = rows_of(plan)
    assert not plan.refusals
    assert r["x_embedder"].action == "fresh" and "input channels: warmup 1 vs this run 3 (--data)" in r["x_embedder"].reason
    assert r["t_embedder"].action == "carry" and r["blocks"].action == "carry"
    assert r["pos_embed"].action == "rebuild" and "16x16 grid (the warmup's 8x8); never copied" in r["pos_embed"].reason
    assert r["projectors.0"].action == "fresh" and "projector width: warmup 32 vs this run 16 (--projector-dim)" in \
        r["projectors.0"].reason and "target feature width: warmup 64 vs this run 48 (--encoder)" in r["projectors.0"].reason
    note = plan.note()
    for part in ("x_embedder", "label rows", "pos_embed", "projectors.0", "fresh: 'x'"):
        assert part in note
    rec = plan.record()
    assert rec["label_rows"] == {"0": 1, "1": 3, "3": 10} and "blocks 0..1 (warmed up)" in rec["carried"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = apply_transfer(plan, warm, model)
    own = model.state_dict()
    assert torch.equal(own["blocks.1.attn.qkv.weight"], warm["blocks.1.attn.qkv.weight"])
    assert torch.equal(own["y_embedder.embedding_table.weight"][1], warm["y_embedder.embedding_table.weight"][3])
    assert torch.equal(own["y_embedder.embedding_table.weight"][2], before["y_embedder.embedding_table.weight"][2])
    for k in ("x_embedder.proj.weight", "pos_embed", "projectors.0.0.weight", "blocks.2.attn.qkv.weight"):
        assert torch.equal(own[k], before[k]) and k not in keys, k  # fresh / rebuilt / later blocks: this run's own


def test_patch_size_is_fresh_and_what_must_match_is_refused():
    warm = warm_sd()
    m4 = build_model("SiT-D/4", input_size=16, in_channels=1, num_classes=10, depth=4, encoder_depth=2, z_dims=[64],
                     projector_dim=32)
    plan = plan_transfer(warm, m4, reuse_labels="positional")
    assert "patch size: warmup 2 vs this run 4 (--model)" in rows_of(plan)["x_embedder"].reason
    wide = build_model("SiT-T/2", input_size=16, in_channels=1, num_classes=10, z_dims=[64], projector_dim=32)
    assert plan_transfer(warm, wide, reuse_labels="positional").refusals == \
        ["width: warmup 96 vs this run 192 (--model)", "MLP width: warmup 384 vs this run 768 (--model)"]
    refused = plan_transfer(warm, sit(qk_norm=True), reuse_labels="positional", warm_config={"num_heads": 3},
                            warm_encoder="digits-cnn", encoder="dinov2-vit-b").refusals
    assert refused == ["attention heads: warmup 3 vs this run 2 (--model)",
                       "QK-norm: warmup off vs this run on (--no-qk-norm)",
                       "target encoder family: warmup digits-cnn vs this run dinov2 (--encoder)"]
    shallow = sit(depth=1, encoder_depth=1)
    assert "depth: the warmup has 2 blocks, this run's model 1 (--model)" in \
        plan_transfer(warm, shallow, reuse_labels="positional").refusals
    with pytest.raises(ValueError, match="cannot transfer the warmup: QK-norm"):
        apply_transfer(plan_transfer(warm, sit(qk_norm=True), reuse_labels="positional"), warm, sit(qk_norm=True))
    assert encoder_family("dinov2-vit-b_reg") == "dinov2" == encoder_family("dinov2-vit-s")


# --------------------------------------------------------------------------------------------
# Digits subsets, resolution, encoder
# --------------------------------------------------------------------------------------------
def test_digit_subsets():
    assert digit_classes("digits") == tuple(range(10)) and digit_classes("digits:0-4") == (0, 1, 2, 3, 4)
    assert digit_classes("digits:9,5-7") == (5, 6, 7, 9)
    for bad in ("digits:", "digits:3-1", "digits:10", "digits:a"):
        with pytest.raises(ValueError, match="--data digits.*e.g. digits:0-4"):
            digit_classes(bad)
    full, sub = DigitsData(), load_train_data("digits:5-9", "cpu")
    assert full.class_names == [str(d) for d in range(10)] and sub.class_names == ["5", "6", "7", "8", "9"]
    assert sub.num_classes == 5 and set(sub.labels.tolist()) == set(range(5))
    keep = full.labels >= 5
    assert torch.equal(sub.images, full.images[keep]) and torch.equal(sub.labels, full.labels[keep] - 5)
    assert resolve_config(TrainConfig(data="digits:0-4")).model == "SiT-D/2"  # the digits defaults


def test_subset_reference_and_accuracy_score_real_digits():
    from erw_fast.data.digits import DigitsDataset
    from erw_fast.engine.samples import digit_accuracy
    from erw_fast.metrics import digits_reference_features, digits_reference_stats, feature_stats

    ds = DigitsDataset()
    mu, sigma = digits_reference_stats(digits=(5, 6, 7, 8, 9))
    mu_ref, _ = feature_stats(digits_reference_features()[ds.labels >= 5])
    assert np.allclose(mu, mu_ref) and not np.allclose(mu, digits_reference_stats()[0])
    assert np.array_equal(digits_reference_stats(digits=range(10))[0], digits_reference_stats()[0])
    # real 5..9, class-major: a digits:5-9 grid is scored as its digits, not as 0..4
    imgs = torch.cat([ds.images[ds.labels == d][:2] for d in range(5, 10)])
    assert digit_accuracy(imgs, (5, 6, 7, 8, 9), 2) > 0.9 > digit_accuracy(imgs, range(5), 2)


def test_resolution_any_multiple_of_the_patch_and_the_encoder_is_kept(tmp_path):
    folder = make_folder(tmp_path / "f", classes=("a", "b"), per_class=3, side=20, mode="L")
    c = resolve_config(TrainConfig(data=f"imagefolder:{folder}", resolution=16, model="SiT-D/2", encoder=D))
    assert c.encoder == D and c.resolution == 16  # an explicit encoder is never replaced
    assert resolve_config(TrainConfig(data=f"imagefolder:{folder}")).encoder == "dinov2-vit-b"  # the default
    for res, model in ((18, "SiT-D/4"), (2, "SiT-D/4")):
        with pytest.raises(ValueError, match=rf"--resolution {res}: use a multiple of {model}'s patch size 4"):
            resolve_config(TrainConfig(data=f"imagefolder:{folder}", resolution=res, model=model))
    assert load_train_data(f"imagefolder:{folder}", "cpu", resolution=24).input_size == 24


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def digits_warmup(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("warm") / "digits")
    train(TrainConfig(out=out, warmup_steps=2, steps=0, **TINY))
    return os.path.join(out, "checkpoints", "0000002.pt")


def test_digits_warmup_starts_an_image_folder_run(tmp_path, digits_warmup, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("1", "3", "seven"), per_class=4, side=20)
    res = train(TrainConfig(out=str(tmp_path / "run"), data=f"imagefolder:{folder}", resolution=16, model="SiT-D/2",
                            encoder=D, warmup_from=digits_warmup, steps=2, **TINY))
    assert res.status == "finished" and res.steps == 4
    err = capsys.readouterr().err
    assert "note: not carried from the warmup:" in err and "x_embedder (patch embedding) (input channels: warmup 1 " \
        "vs this run 3 (--data))" in err and "fresh: 'seven'" in err
    tr = next(r for r in metrics(res.out) if r.get("event") == "transfer")
    assert tr["label_rows"] == {"0": 1, "1": 3, "3": 10}
    assert {f["group"] for f in tr["fresh"]} == {"x_embedder (patch embedding)", "y_embedder (label rows)",
                                                   "projectors.0"}  # image folders default to --projector-dim 2048
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["transfer"]["fresh"] == tr["fresh"] and ckpt["args"]["encoder"] == D


def test_an_image_folder_warmup_starts_a_digits_run(tmp_path):
    folder = make_folder(tmp_path / "grey", classes=("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "x"),
                         per_class=2, side=16, mode="L")
    warm = str(tmp_path / "warm")
    train(TrainConfig(out=warm, data=f"imagefolder:{folder}", resolution=16, model="SiT-D/2", encoder=D,
                      projector_dim=256, warmup_steps=2, steps=0, **TINY))
    res = train(TrainConfig(out=str(tmp_path / "digits"), data="digits:5-9",
                            warmup_from=os.path.join(warm, "checkpoints", "0000002.pt"), steps=2, **TINY))
    tr = next(r for r in metrics(res.out) if r.get("event") == "transfer")
    assert tr["fresh"] == [] and tr["label_rows"] == {"0": 5, "1": 6, "2": 7, "3": 8, "4": 9, "5": 11}
    assert "x_embedder (patch embedding)" in tr["carried"] and "pos_embed (sin-cos table)" in tr["carried"]


def test_digit_halves_share_no_class_rows(tmp_path):
    warm = str(tmp_path / "w")
    train(TrainConfig(out=warm, data="digits:0-4", warmup_steps=2, steps=0, **TINY))
    res = train(TrainConfig(out=str(tmp_path / "r"), data="digits:5-9",
                            warmup_from=os.path.join(warm, "checkpoints", "0000002.pt"), steps=2, **TINY))
    tr = next(r for r in metrics(res.out) if r.get("event") == "transfer")
    assert tr["label_rows"] == {"5": 5}  # only the null row: 5..9 start fresh, named
    assert "fresh: '5', '6', '7', '8', '9'" in tr["fresh"][0]["reason"]
    # evaluation reads the run's classes as the digits 5..9, against the 5..9 images
    from erw_fast.evaluation.samples import evaluate, sample_for_evaluation

    _, labels = sample_for_evaluation(res.checkpoint, 10, steps=2, batch_size=10, feature_net="digits")
    assert sorted(set(labels.tolist())) == [5, 6, 7, 8, 9]
    got = evaluate(ckpt=res.checkpoint, num_samples=10, steps=2, batch_size=10, device="cpu")
    assert 0 <= got["accuracy"] <= 1 and got["fid"] > 0


def test_plan_transfer_prints_and_writes_nothing(tmp_path, digits_warmup, capsys):
    out = tmp_path / "never"
    assert main(["--warmup-from", digits_warmup, "--plan-transfer", "--data", "digits:3-7", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "y_embedder (label rows)       carry    5 of 5 classes carried (matched by class name); null row carried" \
        in text and "blocks 0..1 (warmed up)       carry" in text
    assert main(["--warmup-from", digits_warmup, "--plan-transfer", "--qk-norm", "--out", str(out)]) == 2
    assert "refused: QK-norm: warmup off vs this run on (--no-qk-norm)" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("flags,match", [
    (["--qk-norm"], r"does not fit this run: QK-norm: warmup off vs this run on \(--no-qk-norm\)$"),
    (["--model", "SiT-T/2"], r"width: warmup 96 vs this run 192 \(--model\)"),
])
def test_refusals_leave_nothing_written(tmp_path, digits_warmup, capsys, flags, match):
    import re

    out = tmp_path / "never"
    assert main(["--warmup-from", digits_warmup, "--out", str(out), "--no-progress", "--steps", "1"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_another_target_encoder_family_is_refused(tmp_path, digits_warmup, tiny_dinov2_dir, capsys):
    out = tmp_path / "never"
    assert main(["--warmup-from", digits_warmup, "--out", str(out), "--no-progress", "--encoder", "dinov2-vit-b",
                 "--encoder-path", tiny_dinov2_dir]) == 2
    err = capsys.readouterr().err
    assert f"target encoder family: warmup {D} vs this run dinov2 (--encoder)" in err and not out.exists()

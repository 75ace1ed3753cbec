"""CKNNA (erw_fast.evaluation.cknna) against a loop reference written from the formulas, and the
representation probe (erw_fast.evaluation.probe, python -m erw_fast.probe) on a short ERW warmup."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from erw_fast.evaluation.cknna import cknna
from erw_fast.evaluation.probe import format_table, probe_checkpoint


# --------------------------------------------------------------------------------------------
# Reference: explicit loops, straight from the definitions
# --------------------------------------------------------------------------------------------
def _ref_hsic(k, l):
    """Song et al. (2012) eq. 5 with K̃, L̃ the kernels with zero diagonals."""
    n = len(k)
    kt = [[0.0 if i == j else k[i][j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i][j] for j in range(n)] for i in range(n)]
    trace = 0.0   # tr(K̃ L̃) = Σ_i Σ_j K̃_ij L̃_ji
    sum_k = 0.0   # 1ᵀ K̃ 1
    sum_l = 0.0   # 1ᵀ L̃ 1
    for i in range(n):
        for j in range(n):
            trace += kt[i][j] * lt[j][i]
            sum_k += kt[i][j]
            sum_l += lt[i][j]
    col_k = [0.0] * n  # (1ᵀ K̃)_j
    row_l = [0.0] * n  # (L̃ 1)_j
    for i in range(n):
        for j in range(n):
            col_k[j] += kt[i][j]
            row_l[i] += lt[i][j]
    cross = sum(col_k[j] * row_l[j] for j in range(n))  # 1ᵀ K̃ L̃ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def _ref_cknna(a, b, topk):
    n = len(a)

    def unit(rows):
        out = []
        for r in rows:
            norm = math.sqrt(sum(v * v for v in r))
            out.append([v / norm for v in r])
        return out

    def kernel(rows):
        return [[sum(x * y for x, y in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]

    def neighbours(k):  # j ≠ i with the topk largest k[i][j]; Python's sort is stable: ties to the lower j
        return [set(sorted((j for j in range(n) if j != i), key=lambda j: -k[i][j])[:topk]) for i in range(n)]

    k, l = kernel(unit(a.tolist())), kernel(unit(b.tolist()))
    nk, nl = neighbours(k), neighbours(l)

    def masked(m, keep):
        return [[m[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]

    both = lambda i, j: i != j and j in nk[i] and j in nl[i]  # noqa: E731
    num = _ref_hsic(masked(k, both), masked(l, both))
    kk = _ref_hsic(masked(k, lambda i, j: j in nk[i]), masked(k, lambda i, j: j in nk[i]))
    ll = _ref_hsic(masked(l, lambda i, j: j in nl[i]), masked(l, lambda i, j: j in nl[i]))
    return num / math.sqrt(kk * ll)


# --------------------------------------------------------------------------------------------
# CKNNA
# --------------------------------------------------------------------------------------------
def test_cknna_self_is_one():
    x = np.random.default_rng(0).standard_normal((200, 16))
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cknna(torch.from_numpy(x).float(), torch.from_numpy(x).float(), topk=5) == pytest.approx(1.0, abs=1e-12)


def test_cknna_rotation_and_scale_invariant():
    r = np.random.default_rng(1)
    a = r.standard_normal((150, 12))
    b = a @ r.standard_normal((12, 20)) + 0.7 * r.standard_normal((150, 20))
    q_a, _ = np.linalg.qr(r.standard_normal((12, 12)))
    q_b, _ = np.linalg.qr(r.standard_normal((20, 20)))
    ref = cknna(a, b)
    assert 0.2 < ref < 1.0
    assert cknna(a @ q_a, b) == pytest.approx(ref, abs=1e-10)
    assert cknna(a, b @ q_b) == pytest.approx(ref, abs=1e-10)
    assert cknna(a * r.uniform(0.1, 10.0, (150, 1)), b) == pytest.approx(ref, abs=1e-10)  # rows are normalised


def test_cknna_independent_features_near_zero():
    r = np.random.default_rng(2)
    for d in (8, 64):
        assert abs(cknna(r.standard_normal((400, d)), r.standard_normal((400, d)))) < 0.1


@pytest.mark.parametrize("n,d1,d2,topk,noise", [(30, 5, 7, 4, 0.5), (24, 3, 3, 2, 2.0), (20, 6, 4, 17, 1.0)])
def test_cknna_matches_loop_reference(n, d1, d2, topk, noise):
    r = np.random.default_rng(n + topk)
    a = r.standard_normal((n, d1))
    b = a @ r.standard_normal((d1, d2)) + noise * r.standard_normal((n, d2))
    assert cknna(a, b, topk) == pytest.approx(_ref_cknna(a, b, topk), abs=1e-10)
    assert cknna(b, a, topk) == pytest.approx(_ref_cknna(b, a, topk), abs=1e-10)


@pytest.mark.parametrize("a_shape,b_shape,topk,match", [
    ((20, 4), (19, 4), 3, "same number of rows"),
    ((11, 4), (11, 4), 10, "more than topk"),
    ((3, 4), (3, 4), 1, "at least 4"),
    ((20,), (20,), 3, "2-D"),
    ((20, 4, 1), (20, 4), 3, "2-D"),
    ((20, 4), (20, 4), 0, "topk"),
])
def test_cknna_bad_shapes_raise(a_shape, b_shape, topk, match):
    with pytest.raises(ValueError, match=match):
        cknna(np.ones(a_shape), np.ones(b_shape), topk)
    assert np.isfinite(cknna(np.random.default_rng(0).standard_normal((12, 4)),
                             np.random.default_rng(1).standard_normal((12, 4)), 10))  # n = topk + 2 is fine


def test_cknna_nan_input_raises():
    x = np.random.default_rng(0).standard_normal((20, 4))
    y = x.copy()
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cknna(x, y, 3)


# --------------------------------------------------------------------------------------------
# The probe on a short ERW warmup of the embedded default
# --------------------------------------------------------------------------------------------
WARMUP = 60


def _config(out):
    from erw_fast.engine import TrainConfig

    return TrainConfig(out=out, warmup_steps=WARMUP, steps=1, batch_size=32, progress=False, threads=1,
                       samples_per_class=1, sample_steps=2)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    from erw_fast.engine import train

    out = str(tmp_path_factory.mktemp("probe") / "run")
    result = train(_config(out))
    assert result.status == "finished"
    return out


def _initial_warmup_model(out):
    """The warmup SiT exactly as the engine builds it before its first step."""
    from erw_fast.data import load_train_data
    from erw_fast.engine.build import build_net
    from erw_fast.engine.config import resolve_config

    cfg = resolve_config(_config(out))
    return build_net(cfg, load_train_data("digits", "cpu"), [64], warm=True)


def test_probe_shows_warmup_alignment(warm_run):
    ckpt = os.path.join(warm_run, "checkpoints", f"{WARMUP:07d}.pt")
    after = probe_checkpoint(ckpt, num_images=128, noise_levels=())
    before = probe_checkpoint(_initial_warmup_model(warm_run), num_images=128, noise_levels=())
    assert after["phase"] == "warmup" and after["weights"] == "model" and after["step"] == WARMUP
    assert after["aligned_block"] == 1 and [b["block"] for b in after["blocks"]] == [0, 1]
    assert after["noise_levels"] == [0.0] and after["encoder"] == "digits-ssl"  # the label-free default
    assert "validation split" in after["held_out"]
    at_init, warmed = before["blocks"][1]["cknna"][0.0], after["blocks"][1]["cknna"][0.0]
    # measured (2-core CPU VM, one thread): digits-ssl 0.13 -> 0.35; the label-trained digits-cnn 0.12 -> 0.62
    assert warmed > at_init + 0.15, (at_init, warmed)


def test_probe_reads_an_erw_style_warmup_state_dict(warm_run):
    """ERW's released warmup file: blocks 0..L-1, no final layer, no ``phase``; load_checkpoint refuses
    it for generation, the probe builds the model from the weights' shapes."""
    from erw_fast.models.checkpoint import read_checkpoint

    path = os.path.join(warm_run, "checkpoints", f"{WARMUP:07d}.pt")
    ckpt = read_checkpoint(path)
    bare = {"model": {k: v for k, v in ckpt["model"].items() if not k.startswith("final_layer.")},
            "args": {"use_rope": True, "encoder_depth": 2}}
    ours = probe_checkpoint(path, num_images=40, noise_levels=(0.5,), topk=5)
    theirs = probe_checkpoint(bare, num_images=40, noise_levels=(0.5,), topk=5)
    assert theirs["weights"] == "model" and theirs["aligned_block"] == 1
    flat = lambda r: [v for b in r["blocks"] for _, v in sorted(b["cknna"].items())]  # noqa: E731
    assert flat(theirs) == pytest.approx(flat(ours), abs=1e-12)


def test_probe_cli_writes_table_and_json(warm_run, tmp_path, capsys):
    from erw_fast.probe import main

    out = tmp_path / "probe.json"
    result = main(["--ckpt", warm_run, "--num-images", "40", "--noise-levels", "0.5,1", "--topk", "5",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert "t=0.5" in printed and "t=1" in printed and "wrote" in printed
    saved = json.loads(out.read_text())
    assert saved["checkpoint"].endswith(f"{WARMUP + 1:07d}.pt") and saved["phase"] == "train"
    assert saved["weights"] == "ema" and saved["num_images"] == 40 and saved["topk"] == 5
    assert saved["noise_levels"] == [0.0, 0.5, 1.0] and len(saved["blocks"]) == 4
    for row, row_saved in zip(result["blocks"], saved["blocks"]):
        assert set(row_saved["cknna"]) == {"0.0", "0.5", "1.0"}
        assert all(np.isfinite(v) for v in row["cknna"].values())
    assert format_table(result).splitlines()[3].startswith("   1*")


@pytest.mark.parametrize("argv,match", [
    (["--num-images", "11"], "--num-images"),
    (["--num-images", "360"], "--num-images"),
    (["--noise-levels", "0,1.5"], "--noise-levels"),
    (["--noise-levels", "a"], "--noise-levels"),
    (["--topk", "0"], "--topk"),
    (["--encoder", "digits-cnn,digits-cnn"], "--encoder"),
])
def test_probe_cli_bad_input_names_the_flag(warm_run, argv, match):
    from erw_fast.probe import main

    with pytest.raises(ValueError, match=match):
        main(["--ckpt", warm_run, "--out", ""] + argv)


def test_probe_cli_help_and_error_line():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "erw_fast.probe", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "--noise-levels" in done.stdout
    done = subprocess.run([sys.executable, "-m", "erw_fast.probe", "--ckpt", "/nonexistent/x.pt"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_probe_writes_into_the_run_folder_and_help_names_imagefolder(warm_run, tmp_path, monkeypatch, capsys):
    """Issue 25: probe.json went into the current folder by default; --help omitted imagefolder:DIR."""
    from erw_fast.probe import build_parser, main

    monkeypatch.chdir(tmp_path)
    main(["--ckpt", warm_run, "--num-images", "12", "--noise-levels", "0", "--topk", "5"])
    assert not (tmp_path / "probe.json").exists()
    latest = sorted(os.listdir(os.path.join(warm_run, "checkpoints")))[-1][:-3]
    saved = os.path.join(warm_run, f"probe-{latest}.json")
    assert os.path.isfile(saved) and f"wrote {saved}" in capsys.readouterr().out
    text = " ".join(build_parser().format_help().split())
    assert "imagefolder:DIR" in text and "probe-<checkpoint name>.json in the run folder" in text
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*f/p.json: .*is a file, not a folder"):
        main(["--ckpt", warm_run, "--out", str(tmp_path / "f" / "p.json")])


@pytest.mark.parametrize("kw,what", [(dict(method="vanilla"), "--method vanilla"),
                                     (dict(method="vanilla", encoder="none"), "--encoder none")])
def test_probe_of_a_run_without_an_encoder_asks_for_one(tmp_path, kw, what):
    from erw_fast.engine import TrainConfig, train
    from erw_fast.probe import main

    out = str(tmp_path / "vanilla")
    train(TrainConfig(out=out, steps=1, batch_size=4, log_every=1, sample_steps=1, samples_per_class=1,
                      progress=False, threads=1, **kw))
    with pytest.raises(ValueError, match="trained without a target encoder .*" + what + ".*pass --encoder"):
        main(["--ckpt", out, "--out", ""])
    result = main(["--ckpt", out, "--out", "", "--encoder", "digits-cnn", "--num-images", "12", "--noise-levels", "0",
                   "--topk", "5"])
    assert result["encoder"] == "digits-cnn" and len(result["blocks"]) == 4


def test_align_probe_every_logs_a_rising_cknna_during_the_warmup(tmp_path):
    """``--align-probe-every``: the alignment block's CKNNA is logged while training; the warmup raises it."""
    import json

    from erw_fast.engine import TrainConfig, train

    out = str(tmp_path / "run")
    train(TrainConfig(out=out, warmup_steps=40, steps=2, batch_size=32, progress=False, threads=1,
                      samples_per_class=1, sample_steps=2, align_probe_every=20))
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"align_probe"' in line]
    warm = [r for r in rows if r["phase"] == "warmup"]
    assert [r["step"] for r in warm] == [20, 40] and all(r["block"] == 1 for r in warm)  # 0-based, as the probe
    assert warm[1]["cknna"] > warm[0]["cknna"] > 0


@pytest.mark.parametrize("data", ["digits", "digits:0-4", "digits:5,7"])
def test_digits_subsets_default_to_the_digits_encoder(data):
    """A checkpoint that records no encoder, probed on a digits subset: the digits' default encoder
    (not DINOv2, which the digits' 16-px images do not fit)."""
    from erw_fast.encoders.digits import DEFAULT_DIGITS_ENCODER
    from erw_fast.evaluation.probe import _encoder_choice

    assert _encoder_choice(data, None, None, {"method": "erw"}) == (DEFAULT_DIGITS_ENCODER, None)

"""Evaluation that cannot report a false number (issue 25, class 3) and CLIs that refuse before the
expensive work (classes 5 and 8): every reference and sample file is validated on load in one place
(``evaluation.samples.read_npz`` / ``load_reference`` / ``load_npz_samples``), ``frechet_distance``
refuses covariances that are not PSD and negative results, the Inception Score uses ADM's 5,000-sample
splits, and sample / evaluate / export / probe check their outputs and inputs before sampling."""
import os
import pickle

import numpy as np
import pytest
import torch

from erw_fast.evaluation.samples import evaluate, load_npz_samples, load_reference
from erw_fast.metrics import COV_TOL, frechet_distance, inception_score
from erw_fast.models.sit import SiT
from erw_fast.utils.cli import run_cli

D = 6


def _stats(seed=0, n=50):
    f = np.random.default_rng(seed).normal(size=(n, D))
    return f.mean(0), np.cov(f, rowvar=False)


def _ref(tmp_path, name="ref.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


# --------------------------------------------------------------------------------------------
# frechet_distance
# --------------------------------------------------------------------------------------------
def test_frechet_refuses_a_sigma_that_is_not_psd():
    mu, s = _stats()
    bad = -np.eye(D) * 5  # trace -30: the old code clamped the negative result to FID 0.0
    with pytest.raises(ValueError, match=r"sigma2: not positive semi-definite"):
        frechet_distance(mu, s, mu, bad)
    with pytest.raises(ValueError, match=r"sigma1: not symmetric"):
        frechet_distance(mu, np.triu(np.ones((D, D))), mu, s)
    with pytest.raises(ValueError, match=r"sigma1: contains NaN"):
        frechet_distance(mu, np.full((D, D), np.nan), mu, s)


def test_frechet_accepts_round_off_and_singular_covariances():
    mu, s = _stats(n=4)  # N < D: singular, eigenvalues of round-off size below 0
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    jitter = s + np.eye(D) * (-COV_TOL / 10) * np.abs(np.linalg.eigvalsh(s)).max()
    assert frechet_distance(mu, jitter, mu, s) >= 0.0


def test_frechet_refuses_a_negative_value(monkeypatch):
    import erw_fast.metrics as m

    mu, s = _stats()
    real = np.linalg.eigvalsh
    calls = []

    def inflated(a):  # the eigenvalues of sqrt(S1) S2 sqrt(S1) made too large: the sum goes negative
        calls.append(1)
        w = real(a)
        return w * 4 if len(calls) == 3 else w

    monkeypatch.setattr(m.np.linalg, "eigvalsh", inflated)
    with pytest.raises(ValueError, match="negative beyond round-off"):
        frechet_distance(mu, s, mu, s)


# --------------------------------------------------------------------------------------------
# Reference and sample files: one validation
# --------------------------------------------------------------------------------------------
def test_reference_files_are_validated_with_the_flag_file_and_key(tmp_path):
    mu, s = _stats()
    ok = load_reference(_ref(tmp_path, mu=mu, sigma=s))
    assert ok["images"] is None and ok["mu"].shape == (D,)
    cases = {
        "nanmu.npz": (dict(mu=np.full(D, np.nan), sigma=s), r"--ref .*nanmu.npz: mu: contains NaN"),
        "nonpsd.npz": (dict(mu=mu, sigma=-np.eye(D)), r"--ref .*nonpsd.npz: sigma: not positive semi-definite"),
        "asym.npz": (dict(mu=mu, sigma=np.triu(np.ones((D, D)))), r"--ref .*asym.npz: sigma: not symmetric"),
        "infsigma.npz": (dict(mu=mu, sigma=s * np.inf), r"--ref .*infsigma.npz: sigma: contains NaN or inf"),
        "nosigma.npz": (dict(mu=mu), r"--ref .*nosigma.npz: sigma: missing"),
        "shape.npz": (dict(mu=mu, sigma=s[:3]), r"--ref .*shape.npz: mu \(6,\) and sigma \(3, 6\)"),
        "nothing.npz": (dict(labels=np.zeros(3)), r"--ref .*nothing.npz: mu, sigma: missing"),
        "float_images.npz": (dict(arr_0=np.zeros((2, 8, 8, 1))), r"float_images.npz: arr_0: must be uint8"),
        "text.npz": (dict(mu=np.array(["a"] * D), sigma=s), r"text.npz: mu, sigma: <U1 and float64, expected numbers"),
    }
    for name, (arrays, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            load_reference(_ref(tmp_path, name, **arrays))


def test_damaged_files_are_one_line_errors(tmp_path, capsys):
    from erw_fast import evaluate as cli

    mu, s = _stats()
    whole = open(_ref(tmp_path, "whole.npz", mu=mu, sigma=s), "rb").read()
    (tmp_path / "trunc.npz").write_bytes(whole[: len(whole) // 2])
    with open(tmp_path / "pickle.npz", "wb") as f:
        pickle.dump({"mu": mu, "sigma": s}, f)
    np.save(tmp_path / "single.npy", mu)
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=s)
    expect = {"trunc.npz": "not a readable .npz archive (truncated or damaged",
              "pickle.npz": "not a .npz archive of arrays (it holds pickled data, which is never loaded)",
              "single.npz": "a single .npy array, not a .npz archive",
              "empty.npz": "not a readable .npz archive",
              "objects.npz": "objects.npz: mu: cannot be read (holds objects"}
    for name, text in expect.items():
        with pytest.raises(ValueError, match=r"--ref .*" + name.replace(".", r"\.")) as e:
            load_reference(str(tmp_path / name))
        assert text in str(e.value) and "allow_pickle" not in str(e.value)
        code = run_cli(cli.main, ["--npz", str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --npz {tmp_path / name}: ")


def test_sample_files_are_validated(tmp_path):
    img = np.zeros((4, 8, 8, 1), np.uint8)
    arr, labels = load_npz_samples(_ref(tmp_path, "ok.npz", arr_0=img, labels=np.arange(4)))
    assert labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"--npz .*: labels: shape \(2, 2\), expected \(4,\)"):
        load_npz_samples(_ref(tmp_path, "l2d.npz", arr_0=img, labels=np.zeros((2, 2), int)))
    with pytest.raises(ValueError, match=r"--npz .*: labels: float64, expected integer classes"):
        load_npz_samples(_ref(tmp_path, "lf.npz", arr_0=img, labels=np.zeros(4)))
    with pytest.raises(ValueError, match=r"--npz .*: arr_0: missing"):
        load_npz_samples(_ref(tmp_path, "none.npz", images=img))
    with pytest.raises(ValueError, match=r"--npz .*: arr_0: must be uint8 \(N, H, W, C\) with N >= 1"):
        load_npz_samples(_ref(tmp_path, "zero.npz", arr_0=img[:0]))
    with pytest.raises(FileNotFoundError, match=r"--npz .*missing.npz: file not found"):
        load_npz_samples(str(tmp_path / "missing.npz"))


def test_a_non_psd_reference_no_longer_gives_fid_zero(tmp_path):
    """The issue's case: random images against a sigma that is not PSD reported FID 0.0."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    sample = _ref(tmp_path, "s.npz", arr_0=arr)
    bad = _ref(tmp_path, "bad.npz", mu=np.zeros(128), sigma=-np.eye(128))
    with pytest.raises(ValueError, match=r"--ref .*bad.npz: sigma: not positive semi-definite"):
        evaluate(npz=sample, ref=bad, device="cpu")


# --------------------------------------------------------------------------------------------
# Inception Score: ADM's splits
# --------------------------------------------------------------------------------------------
def _adm_is(preds, split_size=5000):
    """ADM's evaluator's loop, written from its description: consecutive split_size rows, mean of exp(KL)."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n", [12, 4999, 5000, 10_000, 12_345])
def test_inception_score_splits_are_adms(n):
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mean, std = inception_score(p)
    ref_mean, ref_std = _adm_is(p)
    assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    if n == 10_000:  # two splits of 5,000 (10 equal splits of 1,000 gave a different number)
        assert inception_score(p, split_size=1000)[0] != pytest.approx(mean, rel=1e-6)
    if n <= 5000:
        assert std == 0.0  # one split
    with pytest.raises(ValueError, match="split_size"):
        inception_score(p, split_size=0)


# --------------------------------------------------------------------------------------------
# Refusals before the expensive work and before anything is written
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    cfg = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, encoder_depth=1,
               num_classes=3, z_dims=[8], projector_dim=16)
    torch.save({"ema": SiT(**cfg).state_dict(), "args": {"model_config": cfg}}, path)
    return str(path)


@pytest.fixture()
def no_sampling(monkeypatch):
    """Any sampling fails the test: the refusals must come first."""
    import erw_fast.evaluation.samples as ev
    import erw_fast.sampling.generate as gen

    def boom(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(gen, "generate", boom)
    monkeypatch.setattr(ev, "generate", boom)


def test_sample_refuses_before_sampling(tmp_path, tiny_ckpt, no_sampling):
    from erw_fast import sample

    base = ["--ckpt", tiny_ckpt, "--num-samples", "2", "--steps", "2"]
    with pytest.raises(ValueError, match=r"--grid-per-class must be >= 1"):
        sample.main(base + ["--out", str(tmp_path / "s.npz"), "--grid-per-class", "0"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*afile/sub/s.npz: .*afile is a file, not a folder"):
        sample.main(base + ["--out", str(tmp_path / "afile" / "sub" / "s.npz")])
    os.makedirs(tmp_path / "dir.npz")
    with pytest.raises(ValueError, match=r"--out .*dir.npz: is a folder"):
        sample.main(base + ["--out", str(tmp_path / "dir.npz")])
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()


def test_unwritable_folder_is_found_by_trying(tmp_path, monkeypatch):
    """A read-only file system (which root's permission bits do not show) is found by creating a file."""
    import tempfile

    from erw_fast.utils.cli import check_writable

    def rofs(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", rofs)
    with pytest.raises(ValueError, match=r"--out .*m.pt2: cannot write in .* \(read-only file system\)"):
        check_writable(str(tmp_path / "m.pt2"), "--out")


def test_export_refuses_an_unwritable_out_before_compiling(tmp_path, tiny_ckpt, monkeypatch):
    import erw_fast.sampling.export as ex

    monkeypatch.setattr(ex, "_compile_package", lambda *a, **k: pytest.fail("compiled before refusing"))
    monkeypatch.setattr(ex, "_require_aoti", lambda: None)
    (tmp_path / "ro").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=r"--out .*ro/model.pt2: .*ro is a file, not a folder"):
        ex.export_checkpoint(tiny_ckpt, str(tmp_path / "ro" / "model.pt2"))


def test_evaluate_checks_inception_ref_and_outputs_before_sampling(tmp_path, tiny_ckpt, no_sampling):
    from erw_fast import evaluate as cli

    base = ["--ckpt", tiny_ckpt, "--num-samples", "4", "--steps", "2"]
    with pytest.raises(FileNotFoundError, match=r"pass --inception PATH"):
        cli.main(base + ["--feature-net", "inception", "--ref", _ref(tmp_path, mu=np.zeros(3), sigma=np.eye(3))])
    with pytest.raises(ValueError, match=r"--ref .*bad.npz: sigma: not positive semi-definite"):
        cli.main(base + ["--ref", _ref(tmp_path, "bad.npz", mu=np.zeros(3), sigma=-np.eye(3))])
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--json-out .*f/r.json: .*is a file, not a folder"):
        cli.main(base + ["--json-out", str(tmp_path / "f" / "r.json")])
    with pytest.raises(ValueError, match=r"--save-npz .*f/s.npz: .*is a file, not a folder"):
        cli.main(base + ["--save-npz", str(tmp_path / "f" / "s.npz")])

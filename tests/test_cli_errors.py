"""One error style for every command line (erw_fast.utils.cli.run_cli): an expected error prints exactly
one line ``error: ...`` naming the flag, file or shape and exits with status 2; ``--debug`` gives the
traceback. Three CLIs run as real processes (``python -m``, the path a user takes), the rest in-process."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from erw_fast.utils.cli import run_cli

CLIS = ("sample", "evaluate", "export", "preprocess", "extract_features", "convergence")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_m(cli, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", f"erw_fast.{cli}", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("cli", CLIS)
def test_help_lists_debug(cli):
    text = importlib.import_module(f"erw_fast.{cli}").build_parser().format_help()
    assert "--debug" in text and "traceback" in text


def test_sample_as_a_process(tmp_path):
    r = _python_m("sample", "--ckpt", tmp_path / "missing.pt", "--num-samples", "2", "--out", tmp_path / "s.npz")
    assert r.returncode == 2
    assert _one_error_line(r.stderr) == f"error: no such checkpoint: {tmp_path / 'missing.pt'}"
    r = _python_m("sample", "--ckpt", tmp_path / "missing.pt", "--num-samples", "2", "--out", tmp_path / "s.npz",
                  "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_evaluate_as_a_process(tmp_path):
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    r = _python_m("evaluate", "--npz", tmp_path / "rgb.npz")
    assert r.returncode == 2 and r.stdout == ""
    line = _one_error_line(r.stderr)
    assert "rgb.npz: images of shape (4, 32, 32, 3)" in line and "--feature-net inception" in line


def test_export_as_a_process(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = _python_m("export", "--ckpt", junk, "--out", tmp_path / "m.pt2")
    assert r.returncode == 2
    assert _one_error_line(r.stderr).startswith(f"error: {junk} is not a SiT checkpoint: cannot read checkpoint")
    assert not (tmp_path / "m.pt2").exists()


def _in_process(capsys, main, argv):
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


def test_preprocess_in_process(tmp_path, capsys):
    from erw_fast import preprocess

    argv = ["--images", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    code, err = _in_process(capsys, preprocess.main, argv)
    assert code == 2 and _one_error_line(err) == f"error: --images '{tmp_path / 'none'}' is not a folder"
    with pytest.raises(Exception, match="is not a folder"):  # --debug: the exception itself, with its traceback
        preprocess.main(argv + ["--debug"])


def test_extract_features_in_process(tmp_path, capsys):
    from erw_fast import extract_features

    argv = ["--data", str(tmp_path / "none")]
    code, err = _in_process(capsys, extract_features.main, argv)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"error: latent dataset folder '{tmp_path / 'none'}' not found")
    with pytest.raises(Exception, match="latent dataset folder"):
        extract_features.main(argv + ["--debug"])


def test_convergence_in_process(tmp_path, capsys):
    from erw_fast import convergence

    argv = ["--out", str(tmp_path / "study"), "--num-samples", "1", "--plot", "", "--doc", ""]
    code, err = _in_process(capsys, convergence.main, argv)
    assert code == 2 and _one_error_line(err) == "error: --num-samples must be >= 2 for FID, got 1"
    with pytest.raises(ValueError, match="num-samples"):
        run_cli(convergence.main, argv + ["--debug"])
    assert not (tmp_path / "study").exists()


def test_sample_and_evaluate_in_process(tmp_path, capsys):
    """The library entry points raise; run_cli (what ``python -m`` runs) turns that into one line."""
    from erw_fast import evaluate, sample
    from erw_fast.models.sit import SiT

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    cfg = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, encoder_depth=1,
               num_classes=3, z_dims=[8], projector_dim=16)
    torch.save({"ema": SiT(**cfg).state_dict(), "args": {"model_config": cfg}}, path)
    argv = ["--ckpt", str(path), "--num-samples", "2", "--out", str(tmp_path / "s.npz"), "--cfg-scale", "-1"]
    code, err = _in_process(capsys, sample.main, argv)
    assert code == 2
    assert _one_error_line(err) == "error: --cfg-scale must be a finite number >= 0 (1 = no guidance), got -1.0"
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((3, 8, 8, 1), np.uint8), labels=np.array([0, 4, 12]))
    code, err = _in_process(capsys, evaluate.main, ["--npz", str(tmp_path / "labels.npz")])
    assert code == 2 and "labels.npz: labels range 0..12" in _one_error_line(err)


@pytest.mark.parametrize("extra,message", [
    (["--shard-size", "0"], "error: --shard-size must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "error: --batch-size must be an integer >= 1, got 0"),
    (["--workers", "-1"], "error: --workers must be >= 0 (0: decode in the main process), got -1"),
    (["--resolution", "30"], "error: --resolution 30: the SD-VAE downsamples by 8; use a multiple of 8 (256, 512)"),
])
def test_preprocess_refuses_bad_numbers_before_reading(tmp_path, capsys, extra, message):
    """Issue 25: --shard-size 0 divided by zero after the VAE was loaded; every number is checked first."""
    from erw_fast import preprocess

    os.makedirs(tmp_path / "imgs" / "a")
    code, err = _in_process(capsys, preprocess.main, ["--images", str(tmp_path / "imgs"), "--out",
                                                      str(tmp_path / "out")] + extra)
    assert code == 2 and _one_error_line(err) == message
    assert not (tmp_path / "out").exists()


def test_preprocess_and_extract_features_check_out_first(tmp_path, capsys):
    from erw_fast import extract_features, preprocess

    (tmp_path / "f").write_text("x")
    os.makedirs(tmp_path / "imgs" / "a")
    code, err = _in_process(capsys, preprocess.main, ["--images", str(tmp_path / "imgs"), "--out",
                                                      str(tmp_path / "f" / "out")])
    assert code == 2 and _one_error_line(err) == f"error: --out {tmp_path / 'f' / 'out'}: {tmp_path / 'f'} is a file, not a folder"
    for extra, message in ((["--model-patch", "0"], "--model-patch must be an integer >= 1, got 0"),
                           (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
                           (["--token-grid", "0"], "--token-grid must be an integer >= 1, got 0")):
        code, err = _in_process(capsys, extract_features.main, ["--data", str(tmp_path)] + extra)
        assert code == 2 and _one_error_line(err) == "error: " + message

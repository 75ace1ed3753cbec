"""The sampling CLI on a tiny random SiT: outputs, EMA default, per-index seeding across ranks, errors."""
import numpy as np
import pytest
import torch

from erw_fast.models.sit import SiT
from erw_fast.sample import main
from erw_fast.sampling.generate import generate, labels_for_indices, parse_interval
from erw_fast.utils.images import read_png

CFG = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
           num_classes=3, z_dims=[8], projector_dim=16, class_dropout_prob=0.1)


def _random_sit(seed, **overrides):
    torch.manual_seed(seed)
    model = SiT(**{**CFG, **overrides})
    with torch.no_grad():  # leave adaLN-Zero's zero init so the output depends on the weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, ema = _random_sit(0), _random_sit(1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {},
                "args": {"model_config": CFG, "model": "tiny"}, "steps": 10}, path)
    return str(path)


def _load(path):
    with np.load(path) as f:
        return f["arr_0"], f["labels"]


def test_cli_writes_npz_and_png(ckpt, tmp_path):
    out = tmp_path / "run"
    res = main(["--ckpt", ckpt, "--num-samples", "7", "--out", str(out), "--steps", "3", "--batch-size", "4",
                "--no-progress", "--cfg-scale", "2.0", "--guidance-interval", "0,0.7"])
    arr, labels = _load(out / "samples.npz")
    assert arr.dtype == np.uint8 and arr.shape == (7, 8, 8, 1)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert res["shape"] == (7, 8, 8, 1)
    png = read_png(str(out / "samples.png"))
    # 3 class rows x 2 samples each (the fewest per class), upscaled 8x, 1-px padding
    assert png.shape == (3 * 65 + 1, 2 * 65 + 1)
    assert arr.std() > 0


def test_cli_npz_path_class_and_ema_default(ckpt, tmp_path):
    out = str(tmp_path / "s.npz")
    main(["--ckpt", ckpt, "--num-samples", "4", "--out", out, "--steps", "2", "--class", "2",
          "--sampler", "ode-heun", "--no-png", "--no-progress", "--seed", "5"])
    arr, labels = _load(out)
    assert (labels == 2).all() and arr.shape == (4, 8, 8, 1)
    assert not (tmp_path / "s.png").exists()
    # EMA weights by default: identical to sampling the EMA model directly, different from --weights model
    ema = _random_sit(1).eval()
    direct, _ = generate(ema, range(4), (1, 8, 8), [2], seed=5, sampler="ode-heun", steps=2, batch_size=3)
    assert np.abs(direct.astype(int) - arr.astype(int)).max() <= 1
    out2 = str(tmp_path / "m.npz")
    main(["--ckpt", ckpt, "--num-samples", "4", "--out", out2, "--steps", "2", "--class", "2",
          "--sampler", "ode-heun", "--no-png", "--no-progress", "--seed", "5", "--weights", "model"])
    assert np.abs(_load(out2)[0].astype(int) - arr.astype(int)).max() > 5


def test_samples_do_not_depend_on_world_size(ckpt, tmp_path):
    common = ["--ckpt", ckpt, "--num-samples", "9", "--steps", "4", "--no-progress", "--seed", "3"]
    one = str(tmp_path / "one.npz")
    main(common + ["--out", one, "--batch-size", "4"])
    two = str(tmp_path / "two.npz")
    r1 = main(common + ["--out", two, "--batch-size", "2"], rank=1, world_size=2)
    assert "shard" in r1 and not (tmp_path / "two.npz").exists()
    main(common + ["--out", two, "--batch-size", "3"], rank=0, world_size=2)
    a1, l1 = _load(one)
    a2, l2 = _load(two)
    assert np.array_equal(l1, l2)
    diff = np.abs(a1.astype(int) - a2.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # batch-size round-off only
    assert not (tmp_path / "two.shards").exists()
    # a different seed gives different images
    other = str(tmp_path / "other.npz")
    main(["--ckpt", ckpt, "--num-samples", "9", "--steps", "4", "--no-progress", "--seed", "4", "--out", other,
          "--no-png"])
    assert np.abs(_load(other)[0].astype(int) - a1.astype(int)).max() > 5


def test_merge_needs_every_shard(ckpt, tmp_path):
    with pytest.raises(RuntimeError, match="missing shards"):
        main(["--ckpt", ckpt, "--num-samples", "4", "--steps", "1", "--no-progress", "--out",
              str(tmp_path / "x.npz")], rank=0, world_size=2)


def test_bad_inputs(ckpt, tmp_path):
    base = ["--ckpt", ckpt, "--out", str(tmp_path / "b.npz"), "--steps", "1", "--no-progress"]
    with pytest.raises(ValueError, match="num-samples"):
        main(base + ["--num-samples", "0"])
    with pytest.raises(ValueError, match="class"):
        main(base + ["--num-samples", "2", "--class", "3"])
    with pytest.raises(ValueError, match="class"):
        main(base + ["--num-samples", "2", "--class", "two"])
    with pytest.raises(ValueError, match="guidance-interval"):
        main(base + ["--num-samples", "2", "--guidance-interval", "0.8,0.2"])
    with pytest.raises(ValueError, match="steps"):
        main(base + ["--num-samples", "2", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(base + ["--num-samples", "2", "--sampler", "ddim"])
    with pytest.raises(FileNotFoundError):
        main(["--ckpt", str(tmp_path / "none.pt"), "--num-samples", "1", "--out", str(tmp_path / "c.npz")])
    # a model trained without label dropout has no null class: guidance is refused clearly
    path = tmp_path / "nodrop.pt"
    cfg = {**CFG, "class_dropout_prob": 0.0}
    torch.save({"ema": _random_sit(2, class_dropout_prob=0.0).state_dict(), "args": {"model_config": cfg}}, path)
    with pytest.raises(ValueError, match="null class"):
        main(["--ckpt", str(path), "--num-samples", "2", "--out", str(tmp_path / "d.npz"), "--cfg-scale", "2"])


def test_helpers():
    assert parse_interval("0,0.7") == (0.0, 0.7) and parse_interval("0.95") == (0.0, 0.95)
    assert parse_interval("0.1:0.9") == (0.1, 0.9)
    assert labels_for_indices([0, 1, 5], [4, 7]).tolist() == [4, 7, 7]


# --------------------------------------------------------------------------------------------
# python -m erw_fast.sample / erw_fast.evaluate as real processes and evaluate's API
# --------------------------------------------------------------------------------------------
def test_module_entry_points(ckpt, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "p.npz"
    r = subprocess.run([sys.executable, "-m", "erw_fast.sample", "--ckpt", ckpt, "--num-samples", "3", "--out",
                        str(out), "--steps", "2", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "p.png").exists()
    r = subprocess.run([sys.executable, "-m", "erw_fast.evaluate", "--npz", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["num_samples"] == 3 and res["fid"] >= 0 and 0 <= res["accuracy"] <= 1


def test_evaluate_npz_of_real_digits(tmp_path):
    from erw_fast.data.digits import DigitsDataset
    from erw_fast.evaluate import main as evaluate

    val = DigitsDataset(split="val")
    arr = np.clip(np.rint((val.images.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    path = tmp_path / "val.npz"
    np.savez(path, arr_0=arr, labels=val.labels.numpy())
    res = evaluate(["--npz", str(path), "--json-out", str(tmp_path / "r.json")])
    assert res["accuracy"] >= 0.99 and res["num_samples"] == len(arr)
    noise = np.random.default_rng(0).integers(0, 256, arr.shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    bad = evaluate(["--npz", str(tmp_path / "noise.npz")])
    assert "accuracy" not in bad and bad["fid"] > 10 * res["fid"]
    assert (tmp_path / "r.json").exists()


def test_evaluate_reports_fd_in_the_target_encoders_space(tmp_path, tiny_dinov2_dir):
    """``--encoder E``: fd_E against the embedded digits (or --ref's arr_0), equal to the Fréchet distance of
    the encoder's features computed by hand; sFID is null with its reason."""
    from erw_fast.data.digits import DigitsDataset, load_digits
    from erw_fast.encoders import build_encoder
    from erw_fast.evaluate import main as evaluate
    from erw_fast.metrics import EncoderFeatures, feature_stats, frechet_distance

    val = DigitsDataset(split="val")
    arr = np.clip(np.rint((val.images.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(tmp_path / "val.npz", arr_0=arr)
    res = evaluate(["--npz", str(tmp_path / "val.npz"), "--encoder", "digits-ssl"])
    net = EncoderFeatures(build_encoder("digits-ssl"))
    by_hand = frechet_distance(*feature_stats(net.features(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1)),
                               *feature_stats(net.features(load_digits(16)[0])))
    assert res["fd_digits-ssl"] == pytest.approx(by_hand, rel=1e-6)
    assert res["sfid"] is None and "spatial" in res["sfid_note"] and "embedded digits" in res["fd_reference"]
    noise = np.random.default_rng(0).integers(0, 256, arr.shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    assert evaluate(["--npz", str(tmp_path / "noise.npz"), "--encoder", "digits-ssl"])["fd_digits-ssl"] > 10 * by_hand
    # DINOv2 (its CLS token) from a local folder, against --ref's images: the samples themselves give 0
    np.savez(tmp_path / "ref.npz", arr_0=arr[:40])
    d = evaluate(["--npz", str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "ref.npz"), "--encoder", "dinov2-vit-b",
                  "--encoder-path", tiny_dinov2_dir])
    assert d["fd_dinov2-vit-b"] == pytest.approx(0.0, abs=1e-6) and d["fd_reference"].startswith("arr_0 of")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="needs reference images"):
        evaluate(["--npz", str(tmp_path / "val.npz"), "--ref", str(tmp_path / "stats.npz"), "--encoder", "digits-ssl"])


def test_evaluate_checkpoint_and_errors(ckpt, tmp_path):
    from erw_fast.evaluate import main as evaluate

    res = evaluate(["--ckpt", ckpt, "--num-samples", "12", "--steps", "2", "--sampler", "ode-euler",
                    "--save-npz", str(tmp_path / "g.npz")])
    assert res["num_samples"] == 12 and "warning" in res and 0 <= res["accuracy"] <= 1
    assert _load(tmp_path / "g.npz")[0].shape == (12, 8, 8, 1)
    with pytest.raises(FileNotFoundError):
        evaluate(["--npz", str(tmp_path / "missing.npz")])
    np.savez(tmp_path / "nokey.npz", images=np.zeros((3, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        evaluate(["--npz", str(tmp_path / "nokey.npz")])
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        evaluate(["--npz", str(tmp_path / "float.npz")])
    with pytest.raises(ValueError, match="num-samples"):
        evaluate(["--ckpt", ckpt, "--num-samples", "1"])
    with pytest.raises(FileNotFoundError, match="Inception"):
        evaluate(["--npz", str(tmp_path / "g.npz"), "--feature-net", "inception"])


def test_latent_model_is_decoded_with_a_local_sd_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(tmp_path / "vae"))
    cfg = {**CFG, "in_channels": 4}
    path = tmp_path / "latent.pt"
    torch.save({"ema": _random_sit(0, in_channels=4).state_dict(), "args": {"model_config": cfg}}, path)
    out = tmp_path / "lat.npz"
    res = main(["--ckpt", str(path), "--num-samples", "3", "--out", str(out), "--vae", str(tmp_path / "vae"),
                "--steps", "2", "--no-progress"])
    arr, _ = _load(out)
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8 and res["png"].endswith("lat.png")
    with pytest.raises(FileNotFoundError, match="VAE|vae"):
        main(["--ckpt", str(path), "--num-samples", "1", "--out", str(tmp_path / "x.npz"), "--vae",
              str(tmp_path / "no_such_vae"), "--steps", "1", "--no-progress"])


# --------------------------------------------------------------------------------------------
# Refusals, run folders and progress output ("nothing lost, nothing confusing")
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["-1", "nan", "inf"])
def test_cfg_scale_must_be_finite_and_non_negative(ckpt, tmp_path, scale):
    from erw_fast.evaluate import main as evaluate

    out = tmp_path / "g.npz"
    with pytest.raises(ValueError, match=r"--cfg-scale must be a finite number >= 0"):
        main(["--ckpt", ckpt, "--num-samples", "2", "--out", str(out), "--steps", "1", "--no-progress",
              "--cfg-scale", scale])
    with pytest.raises(ValueError, match=r"--cfg-scale must be a finite number >= 0"):
        evaluate(["--ckpt", ckpt, "--num-samples", "2", "--steps", "1", "--no-progress", "--cfg-scale", scale])
    assert not out.exists()


def _run_folder(tmp_path):
    """A run folder with two step checkpoints; the later one (step 20) holds other EMA weights."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step, seed in ((10, 1), (20, 3)):
        torch.save({"model": _random_sit(0).state_dict(), "ema": _random_sit(seed).state_dict(),
                    "args": {"model_config": CFG}, "steps": step}, run / "checkpoints" / f"{step:07d}.pt")
    return run


def test_ckpt_may_be_a_run_folder(tmp_path, capsys):
    from erw_fast.evaluate import main as evaluate

    run = _run_folder(tmp_path)
    latest = str(run / "checkpoints" / "0000020.pt")
    common = ["--num-samples", "4", "--steps", "2", "--no-progress", "--no-png"]
    main(["--ckpt", str(run), "--out", str(tmp_path / "folder.npz")] + common)
    assert f"using the latest checkpoint of {run}: {latest}" in capsys.readouterr().err
    main(["--ckpt", latest, "--out", str(tmp_path / "file.npz")] + common)
    main(["--ckpt", str(run / "checkpoints" / "0000010.pt"), "--out", str(tmp_path / "older.npz")] + common)
    folder, file, older = (_load(tmp_path / f"{n}.npz")[0] for n in ("folder", "file", "older"))
    assert np.array_equal(folder, file) and not np.array_equal(folder, older)
    res = evaluate(["--ckpt", str(run), "--num-samples", "4", "--steps", "1", "--no-progress"])
    assert res["ckpt"] == latest


def test_evaluate_refuses_what_the_digits_network_cannot_score(ckpt, tmp_path):
    from erw_fast.evaluate import main as evaluate

    rgb = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", arr_0=rgb)
    with pytest.raises(ValueError, match=r"rgb\.npz: images of shape \(5, 32, 32, 3\).*greyscale"):
        evaluate(["--npz", str(tmp_path / "rgb.npz")])
    grey = np.zeros((11, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "labels.npz", arr_0=grey, labels=np.arange(11))
    with pytest.raises(ValueError, match=r"labels range 0\.\.10, but the digits classifier reads the classes 0\.\.9"):
        evaluate(["--npz", str(tmp_path / "labels.npz")])
    np.savez(tmp_path / "neg.npz", arr_0=grey, labels=np.full(11, -1))
    with pytest.raises(ValueError, match=r"labels range -1\.\.-1"):
        evaluate(["--npz", str(tmp_path / "neg.npz")])
    np.savez(tmp_path / "ok.npz", arr_0=grey, labels=np.arange(11) % 10)  # labels 0..9: scored
    assert 0 <= evaluate(["--npz", str(tmp_path / "ok.npz")])["accuracy"] <= 1
    # a checkpoint whose samples are RGB is refused before it samples
    path = tmp_path / "rgb.pt"
    torch.save({"ema": _random_sit(0, in_channels=3).state_dict(), "args": {"model_config": {**CFG, "in_channels": 3}}},
               path)
    with pytest.raises(ValueError, match=r"--ckpt .*rgb\.pt: images of shape \(4, 8, 8, 3\)"):
        evaluate(["--ckpt", str(path), "--num-samples", "4", "--steps", "1"])


def test_evaluate_checkpoint_shows_progress_off_a_terminal(ckpt, capsys):
    from erw_fast.evaluate import main as evaluate

    evaluate(["--ckpt", ckpt, "--num-samples", "6", "--steps", "1", "--batch-size", "4"])
    err = capsys.readouterr().err  # captured: not a terminal
    assert "sampling" in err and err.count("6/6") == 1
    evaluate(["--ckpt", ckpt, "--num-samples", "6", "--steps", "1", "--no-progress"])
    assert "sampling" not in capsys.readouterr().err


def test_sample_progress_prints_its_last_line_once(ckpt, tmp_path, capsys, monkeypatch):
    from erw_fast.utils import progress

    monkeypatch.setattr(progress, "NON_TTY_INTERVAL", 0.0)  # print on every update, the final one included
    main(["--ckpt", ckpt, "--num-samples", "3", "--out", str(tmp_path / "p.npz"), "--steps", "1",
          "--batch-size", "1", "--no-png"])
    err = capsys.readouterr().err
    bars = [s for s in err.replace("\r", "\n").splitlines() if s.startswith("sampling")]
    assert [b.split("|")[2].split()[0] for b in bars] == ["0/3", "1/3", "2/3", "3/3"], bars
    assert err.count("3/3") == 1 and "wrote" in err


# --------------------------------------------------------------------------------------------
# The metric set papers report: Inception Score and precision/recall beside FID
# --------------------------------------------------------------------------------------------
def test_evaluate_reports_inception_score_precision_and_recall(tmp_path):
    import json

    from erw_fast.data.digits import DigitsDataset
    from erw_fast.evaluate import main as evaluate

    val = DigitsDataset(split="val")
    n = 200  # 20 a split
    arr = np.clip(np.rint((val.images[:n].numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(tmp_path / "val.npz", arr_0=arr, labels=val.labels[:n].numpy())
    res = evaluate(["--npz", str(tmp_path / "val.npz"), "--json-out", str(tmp_path / "r.json")])
    keys = ("fid", "num_samples", "feature_net", "inception_score", "inception_score_std", "precision", "recall",
            "accuracy", "npz")
    assert set(keys) <= set(res) and json.loads((tmp_path / "r.json").read_text()) == res
    # real digits against all digits (val is part of the reference): every sample is inside
    assert res["precision"] == 1.0 and 0.8 < res["recall"] <= 1.0
    assert 7.0 < res["inception_score"] <= 10.0 and 0 <= res["inception_score_std"] < 1.5  # 10 classes at most
    assert "warning" not in res
    noise = np.random.default_rng(0).integers(0, 256, arr.shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    bad = evaluate(["--npz", str(tmp_path / "noise.npz")])
    assert bad["precision"] < 0.05 and bad["recall"] < 0.05 and bad["inception_score"] < 3.0
    # a reference with statistics but no images: FID, and precision/recall null with the reason
    from erw_fast.metrics import digits_reference_stats

    mu, sigma = digits_reference_stats()
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    only = evaluate(["--npz", str(tmp_path / "val.npz"), "--ref", str(tmp_path / "stats.npz")])
    assert only["fid"] == pytest.approx(res["fid"], rel=1e-5)
    assert only["precision"] is None and only["recall"] is None and "no arr_0" in only["warning"]


def test_evaluate_metrics_on_too_few_samples_are_null(tmp_path, capsys):
    import json

    from erw_fast.evaluate import main as evaluate
    from erw_fast.utils.cli import run_cli

    np.savez(tmp_path / "three.npz", arr_0=np.full((3, 8, 8, 1), 128, np.uint8))
    evaluate(["--npz", str(tmp_path / "three.npz"), "--json-out", str(tmp_path / "r.json")])
    text = (tmp_path / "r.json").read_text()
    assert '"precision": null' in text
    res = json.loads(text)
    # IS as ADM computes it (one split of 3), flagged as biased low; precision/recall cannot be computed
    assert res["inception_score"] == pytest.approx(1.0) and res["recall"] is None and res["fid"] >= 0
    assert "a split of 3 samples for 10 classes, IS is biased low" in res["warning"]
    assert "need more than 3" in res["warning"]
    np.savez(tmp_path / "bad_ref.npz", mu=np.zeros(5))
    capsys.readouterr()
    assert run_cli(evaluate, ["--npz", str(tmp_path / "three.npz"), "--ref", str(tmp_path / "bad_ref.npz")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --ref {tmp_path / 'bad_ref.npz'}: sigma: missing (mu without sigma); FID needs both"]


class _TinyInception(torch.nn.Module):
    """The interface of NVIDIA's TorchScript Inception (features, or the no-bias softmax), 4-d features."""

    def __init__(self):
        super().__init__()
        self.output = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        feats = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(1, 2, 3))[:, None]], 1) / 64.0
        if return_features:
            return feats
        logits = torch.nn.functional.linear(feats, self.output.weight, None if no_output_bias else self.output.bias)
        return torch.nn.functional.softmax(logits, 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_evaluate_inception_path_with_an_adm_style_reference(tmp_path):
    from erw_fast.evaluate import main as evaluate
    from erw_fast.evaluation.inception import InceptionFeatures
    from erw_fast.metrics import compute_features, feature_stats

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_TinyInception()), str(tmp_path / "inception.pt"))
    rng = np.random.default_rng(0)
    ref_imgs = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    samples = np.concatenate([ref_imgs[:20], rng.integers(0, 128, (20, 16, 16, 3), dtype=np.uint8)])
    mu, sigma = feature_stats(compute_features(ref_imgs, InceptionFeatures(str(tmp_path / "inception.pt"))))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref_imgs, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    res = evaluate(["--npz", str(tmp_path / "samples.npz"), "--feature-net", "inception", "--inception",
                    str(tmp_path / "inception.pt"), "--ref", str(tmp_path / "VIRTUAL_ref.npz"), "--device", "cpu"])
    assert res["feature_net"] == "inception-v3" and res["fid"] > 0
    assert 1.0 <= res["inception_score"] <= 6.0 and res["inception_score_std"] >= 0
    assert 0.5 <= res["precision"] <= 1.0 and 0.0 < res["recall"] <= 1.0  # 20 copies of reals are inside

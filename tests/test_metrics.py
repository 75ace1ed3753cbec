"""FID maths, feature statistics, the embedded digits classifier and the Inception loader."""
import os

import numpy as np
import pytest
import torch

from erw_fast.metrics import (
    DigitsFeatures, FeatureNetwork, classifier_accuracy, compute_features, digits_reference_stats,
    feature_stats, fid_from_images, frechet_distance, get_feature_network, images_from_uint8, sqrtm_psd,
)
from erw_fast.evaluation.digits_classifier import WEIGHTS, load_digits_classifier


def random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def naive_fid(mu1, s1, mu2, s2):
    """Reference: tr sqrt(S1 S2) from the (real, non-negative) eigenvalues of the product."""
    ev = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    sd1, sd2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    got = frechet_distance(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # commuting covariances (shared eigenvectors, rotated): same closed form
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    got_rot = frechet_distance(q @ mu1, q @ np.diag(sd1 ** 2) @ q.T, q @ mu2, q @ np.diag(sd2 ** 2) @ q.T)
    assert got_rot == pytest.approx(expected, rel=1e-9)
    # scalar (1-D) case
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


def test_general_covariances_symmetric_and_tensor_inputs():
    rng = np.random.default_rng(2)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    ab = frechet_distance(mu1, s1, mu2, s2)
    ba = frechet_distance(mu2, s2, mu1, s1)
    assert ab == pytest.approx(ba, rel=1e-9)
    assert ab == pytest.approx(naive_fid(mu1, s1, mu2, s2), rel=1e-6)
    t = frechet_distance(torch.tensor(mu1, dtype=torch.float32), torch.tensor(s1, dtype=torch.float32),
                         torch.tensor(mu2), torch.tensor(s2))
    assert t == pytest.approx(ab, rel=1e-5)


def test_singular_covariances_are_stable():
    rng = np.random.default_rng(3)
    d = 64
    s1, s2 = random_cov(rng, d, rank=10), random_cov(rng, d, rank=5)  # fewer samples than dims
    mu = np.zeros(d)
    v = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(v) and v >= 0
    assert v == pytest.approx(naive_fid(mu, s1, mu, s2), rel=1e-5, abs=1e-8)
    assert frechet_distance(mu, s1, mu, s1) < 1e-8
    r = sqrtm_psd(s1)
    assert np.allclose(r @ r, s1, atol=1e-10)


def test_fid_errors():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_feature_stats_matches_numpy():
    f = np.random.default_rng(4).standard_normal((50, 6))
    mu, sigma = feature_stats(torch.tensor(f, dtype=torch.float32))
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    assert np.allclose(mu, f.mean(0), atol=1e-6) and np.allclose(sigma, np.cov(f, rowvar=False), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The embedded digits classifier / feature network
# --------------------------------------------------------------------------------------------
SHIPPED_VAL_ACCURACY = 0.99  # the shipped weights reach 0.9944 on the val split (357 / 359)


def test_classifier_weights_and_val_accuracy():
    from erw_fast.data.digits import DigitsDataset

    assert os.path.getsize(WEIGHTS) < 1_000_000
    blob = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert blob["val_accuracy"] >= SHIPPED_VAL_ACCURACY
    val = DigitsDataset(split="val")
    acc = classifier_accuracy(val.images, val.labels)
    assert acc >= SHIPPED_VAL_ACCURACY, acc
    assert acc == pytest.approx(blob["val_accuracy"], abs=1e-6)
    # uint8 NHWC input (the .npz layout) gives the same answer
    u8 = np.clip(np.rint((val.images.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert classifier_accuracy(u8, val.labels) >= SHIPPED_VAL_ACCURACY


def test_classifier_is_not_the_target_encoder():
    clf = load_digits_classifier()
    enc_path = os.path.join(os.path.dirname(WEIGHTS), "digits_encoder.pt")
    if not os.path.exists(enc_path):
        pytest.skip("no target encoder asset")
    enc = torch.load(enc_path, map_location="cpu", weights_only=True)
    enc_sd = enc.get("state_dict", enc)
    shapes = {tuple(v.shape) for v in enc_sd.values() if torch.is_tensor(v)}
    ours = clf.state_dict()
    assert not set(ours) & set(enc_sd)  # different architecture (no shared parameter names)
    for v in ours.values():  # and no copied tensors
        for w in enc_sd.values():
            if torch.is_tensor(w) and w.shape == v.shape and w.numel() > 1:
                assert not torch.equal(w.float(), v.float())
    assert shapes  # the encoder file was read


def test_digits_fid_behaves():
    from erw_fast.data.digits import DigitsDataset

    net = get_feature_network("digits")
    assert isinstance(net, FeatureNetwork) and net.name == "digits"
    tr, va = DigitsDataset(split="train"), DigitsDataset(split="val")
    ref = digits_reference_stats()
    assert ref[0].shape == (128,) and ref[1].shape == (128, 128)
    fid_val = fid_from_images(va.images, ref, net)
    g = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(va.images, 3, 1, 1)
    noise = torch.rand(len(va.images), 1, 16, 16, generator=g) * 2 - 1
    fid_blur = fid_from_images(blurred, ref, net)
    fid_noise = fid_from_images(noise, ref, net)
    mu_t, s_t = feature_stats(compute_features(tr.images, net))
    mu_v, s_v = feature_stats(compute_features(va.images, net))
    assert frechet_distance(mu_t, s_t, mu_t, s_t) < 1e-6
    assert fid_val < fid_blur < fid_noise, (fid_val, fid_blur, fid_noise)
    assert frechet_distance(mu_t, s_t, mu_v, s_v) < fid_blur


def test_images_from_uint8_and_get_feature_network_errors():
    a = np.array([[[[0], [255]], [[128], [64]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    x = images_from_uint8(a)
    assert x.shape == (1, 1, 2, 2) and x.min() == -1 and x.max() == 1
    with pytest.raises(ValueError, match="uint8"):
        images_from_uint8(a.astype(np.float32))
    with pytest.raises(ValueError, match="unknown feature network"):
        get_feature_network("clip")


# --------------------------------------------------------------------------------------------
# Inception loader
# --------------------------------------------------------------------------------------------
class _TinyDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)
        return feats if return_features else feats.sum(1, keepdim=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_needs_a_local_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ERW_FAST_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match="local weights"):
        get_feature_network("inception")
    with pytest.raises(FileNotFoundError, match="not found"):
        get_feature_network("inception", path=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="TorchScript"):
        get_feature_network("inception", path=str(bad))
    path = str(tmp_path / "tiny.pt")
    torch.jit.save(torch.jit.script(_TinyDetector()), path)
    net = get_feature_network("inception", path=path)
    f = net.features(torch.full((3, 1, 8, 8), 1.0))  # grayscale repeated to RGB, mapped to [0, 255]
    assert f.shape == (3, 2) and torch.allclose(f, torch.full((3, 2), 255.0))

"""FID, Inception Score and precision/recall maths, feature statistics, the embedded digits classifier, the
Inception loader and ADM reference batches."""
import os

import numpy as np
import pytest
import torch

from erw_fast.metrics import (
    DigitsFeatures, FeatureNetwork, classifier_accuracy, compute_features, compute_features_and_probs,
    digits_reference_stats, feature_stats, fid_from_images, frechet_distance, get_feature_network, images_from_uint8,
    inception_score, precision_recall, sqrtm_psd,
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


# --------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019, k = 3 as ADM)
# --------------------------------------------------------------------------------------------
def brute_precision_recall(real, fake, k=3):
    """Reference: full distance matrices, the k-th neighbour excluding itself = column k of the sorted row."""
    def d2(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    r_real, r_fake = np.sort(d2(real, real), 1)[:, k], np.sort(d2(fake, fake), 1)[:, k]
    d = d2(real, fake)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None]).any(1).mean()


def test_precision_recall_closed_forms():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((200, 16))
    assert precision_recall(x, x) == (1.0, 1.0)  # a set against itself
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)  # disjoint, far apart
    same = np.ones((6, 4)) * 3.0  # duplicates: every radius is 0, every distance 0 -> inside
    assert precision_recall(same, same) == (1.0, 1.0)
    # half the fakes are copies of reals, half are far away: precision exactly 1/2
    fake = np.concatenate([x[:50], x[50:100] + 100.0])
    assert precision_recall(x, fake)[0] == 0.5
    # by hand, 1-D, k = 1: real radii 1; fakes 0.5, 4.9, 5 (on the boundary: <=) inside, 10 not
    real = np.arange(5.0)[:, None]
    fake = np.array([[0.5], [10.0], [4.9], [5.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.75 and r == 1.0  # fake radii 4.4, 5, 0.1, 0.1: every real is within 4.4 of 0.5
    assert precision_recall(torch.tensor(real), torch.tensor(fake), k=1) == (p, r)


def test_precision_recall_matches_brute_force_in_any_batch_size():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((130, 8))
    fake = rng.standard_normal((70, 8)) * 1.4 + 0.3
    expected = brute_precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for bs in (7, 64, 4096):
        assert precision_recall(real, fake, batch_size=bs) == pytest.approx(expected, abs=0), bs
    small_real, small_fake = real[:20], fake[:15]  # blocks smaller than k
    for bs in (1, 2):
        assert precision_recall(small_real, small_fake, batch_size=bs) == pytest.approx(
            brute_precision_recall(small_real, small_fake), abs=0)
    assert precision_recall(real, fake, k=5) == pytest.approx(brute_precision_recall(real, fake, k=5), abs=0)


def test_precision_recall_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="more than 3 fake samples, got 3"):
        precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="3-d but fake features are 2-d"):
        precision_recall(x, np.zeros((10, 2)))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(x, np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(x, np.zeros(10))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=0)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------
def test_inception_score_closed_forms():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx((1.0, 0.0), abs=1e-12)  # uniform
    confident = np.eye(10)[np.arange(100) % 10]  # one-hot, every split balanced over 10 classes
    assert inception_score(confident, split_size=10) == pytest.approx((10.0, 0.0), abs=1e-12)
    assert inception_score(confident) == pytest.approx((10.0, 0.0), abs=1e-12)  # one split (N < 5,000)
    assert inception_score(confident[:10], split_size=1) == pytest.approx((1.0, 0.0), abs=1e-12)  # 1 sample a split
    # two splits: 2 classes balanced (IS 2), then 4 classes balanced (IS 4): mean 3, std 1
    two = np.zeros((40, 5))
    two[np.arange(20), np.arange(20) % 2] = 1
    two[20 + np.arange(20), np.arange(20) % 4] = 1
    assert inception_score(two, split_size=20) == pytest.approx((3.0, 1.0), abs=1e-12)
    # ADM's last split is the rest: 20 + 20 + 5 rows (the 5: one class -> IS 1)
    three = np.concatenate([two, np.eye(5)[[0] * 5]])
    assert inception_score(three, split_size=20)[0] == pytest.approx((2 + 4 + 1) / 3, abs=1e-12)
    # soft, balanced predictions: marginal uniform, IS = C exp(-H(p))
    c, eps = 8, 0.3
    soft = (1 - eps) * np.eye(c)[np.arange(64) % c] + eps / c
    row = soft[0]
    assert inception_score(soft, split_size=16)[0] == pytest.approx(c * np.exp((row * np.log(row)).sum()), rel=1e-12)
    assert inception_score(torch.tensor(soft, dtype=torch.float32), split_size=16)[0] == pytest.approx(
        c * np.exp((row * np.log(row)).sum()), rel=1e-5)


def test_inception_score_matches_adms_formula():
    """ADM's compute_inception_score (guided-diffusion evaluations/evaluator.py), re-typed: contiguous
    split_size-row splits (the last one the rest), float32 in, mean only: ours are the same splits."""
    def adm(preds, split_size):
        scores = []
        for i in range(0, len(preds), split_size):
            part = preds[i:i + split_size]
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
            scores.append(np.exp(np.mean(np.sum(kl, 1))))
        return float(np.mean(scores))

    logits = np.random.default_rng(12).standard_normal((1000, 50)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    mean, std = inception_score(p, split_size=100)
    assert mean == pytest.approx(adm(p, 100), rel=1e-5) and std > 0
    assert mean == pytest.approx(adm(p.astype(np.float64), 100), rel=1e-12)
    assert inception_score(p[:930], split_size=100)[0] == pytest.approx(adm(p[:930].astype(np.float64), 100), rel=1e-12)
    big = np.repeat(p.astype(np.float64), 12, axis=0)[:11_000]  # 5,000 + 5,000 + 1,000: ADM's default splits
    assert inception_score(big)[0] == pytest.approx(adm(big, 5000), rel=1e-12)


def test_inception_score_errors():
    with pytest.raises(ValueError, match="not logits"):
        inception_score(np.random.default_rng(0).standard_normal((20, 4)), split_size=2)
    with pytest.raises(ValueError, match=r"N >= 1"):
        inception_score(np.full((0, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        inception_score(np.full(20, 0.5), split_size=2)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(np.full((20, 2), 0.5), split_size=0)


def test_digits_network_gives_softmax_probabilities():
    from erw_fast.data.digits import DigitsDataset

    net = DigitsFeatures()
    val = DigitsDataset(split="val")
    x = val.images[:64]
    feats, probs = compute_features_and_probs(x, net, batch_size=25)
    assert torch.allclose(feats, compute_features(x, net).double(), atol=1e-6)
    with torch.no_grad():
        expected = torch.softmax(net.model(x), dim=1).double().numpy()
    assert probs.shape == (64, 10) and np.allclose(probs, expected, atol=1e-6)
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert (probs.argmax(1) == val.labels[:64].numpy()).mean() > 0.95
    assert torch.allclose(net.probabilities(x), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    u8 = np.clip(np.rint((x.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.allclose(compute_features_and_probs(u8, net)[1], probs, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Inception class probabilities (the Inception Score) from the TorchScript file
# --------------------------------------------------------------------------------------------
class _TinyNvidiaLike(torch.nn.Module):
    """NVIDIA's inception-2015-12-05.pt interface: features, or the softmax of ``output`` (bias optional)."""

    def __init__(self):
        super().__init__()
        self.output = torch.nn.Linear(2, 5)

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        feats = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1) / 255.0
        if return_features:
            return feats
        if no_output_bias:
            logits = torch.nn.functional.linear(feats, self.output.weight, None)
        else:
            logits = self.output(feats)
        return torch.nn.functional.softmax(logits, 1)


class _TinyLogits(_TinyNvidiaLike):
    """Same interface, but it returns logits (not probabilities) and its class output ignores ``output``."""

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        feats = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1) / 255.0
        if return_features:
            return feats
        return torch.cat([feats, -feats, feats * 3], 1)


class _FeaturesOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)


def _script(module, path):
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_probabilities_from_the_torchscript_file(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    module = _TinyNvidiaLike()
    net = get_feature_network("inception", path=_script(module, tmp_path / "nv.pt"))
    assert net.has_probabilities and net.prob_kwargs == {"return_features": False, "no_output_bias": True}
    feats, probs = compute_features_and_probs(x, net, batch_size=4)  # one pass: softmax(features @ W.T)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255)
    with torch.no_grad():
        expected = module(u8, no_output_bias=True).double().numpy()  # no bias, as ADM / StyleGAN
        with_bias = module(u8).double().numpy()
    assert probs.shape == (6, 5) and np.allclose(probs, expected, atol=1e-6)
    assert not np.allclose(probs, with_bias, atol=1e-4)
    assert torch.allclose(feats, module(u8, return_features=True).double(), atol=1e-6)
    assert torch.allclose(net.probabilities(x).double(), torch.tensor(expected), atol=1e-6)
    # logits out of the file: softmaxed; a head that is not the class output: the module's own answer
    logit_net = get_feature_network("inception", path=_script(_TinyLogits(), tmp_path / "logits.pt"))
    _, p = compute_features_and_probs(x, logit_net)
    with torch.no_grad():
        own = torch.softmax(_TinyLogits()(u8), 1).double().numpy()
    assert np.allclose(p, own, atol=1e-6) and logit_net._head is None
    # a features-only file: no class probabilities, no Inception Score
    plain = get_feature_network("inception", path=_script(_FeaturesOnly(), tmp_path / "plain.pt"))
    assert not plain.has_probabilities and compute_features_and_probs(x, plain)[1] is None
    with pytest.raises(ValueError, match="no return_features argument"):
        plain.probabilities(x)


# --------------------------------------------------------------------------------------------
# ADM reference batches (VIRTUAL_imagenet256_labeled.npz layout: arr_0, mu, sigma, spatial extras)
# --------------------------------------------------------------------------------------------
def _digits_u8(images):
    return np.clip(np.rint((images.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_adm_reference_batch_round_trip(tmp_path):
    from erw_fast.data.digits import DigitsDataset
    from erw_fast.evaluation.samples import evaluate_samples, load_reference, reference

    tr, va = DigitsDataset(split="train"), DigitsDataset(split="val")
    ref_imgs, samples = _digits_u8(tr.images[:160]), _digits_u8(va.images[:60])
    net = DigitsFeatures()
    ref_feats = compute_features(ref_imgs, net)
    mu, sigma = feature_stats(ref_feats)
    path = tmp_path / "VIRTUAL_digits.npz"
    np.savez(path, arr_0=ref_imgs, mu=mu, sigma=sigma, mu_s=np.zeros(7), sigma_s=np.eye(7),
             spatial_mu=np.zeros(3), spatial_sigma=np.eye(3))  # ADM's spatial extras are ignored
    r = load_reference(str(path))
    assert np.array_equal(r["images"], ref_imgs) and np.array_equal(r["mu"], mu) and np.array_equal(r["sigma"], sigma)
    sample_feats = compute_features(samples, net)
    stats = feature_stats(sample_feats)  # the same features: FID against the file's mu/sigma is exact
    assert frechet_distance(*stats, r["mu"], r["sigma"]) == frechet_distance(*stats, *feature_stats(ref_feats))
    mu_r, sigma_r, feats_r = reference(net, str(path))
    assert np.array_equal(mu_r, mu) and np.array_equal(sigma_r, sigma)
    assert torch.allclose(feats_r, ref_feats, atol=1e-5)  # float32 convolutions: not bitwise across calls
    res = evaluate_samples(samples, ref=str(path))
    assert res["fid"] == pytest.approx(frechet_distance(*stats, mu, sigma), rel=1e-5)
    images_only = tmp_path / "images_only.npz"  # the same FID from the images' own statistics
    np.savez(images_only, arr_0=ref_imgs)
    res2 = evaluate_samples(samples, ref=str(images_only))
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-5)
    p, rc = precision_recall(ref_feats, sample_feats)
    assert (res["precision"], res["recall"]) == pytest.approx((p, rc), abs=0.01) and 0.5 < p <= 1
    assert (res2["precision"], res2["recall"]) == pytest.approx((p, rc), abs=0.01)
    stats_only = tmp_path / "stats_only.npz"  # mu/sigma alone: FID, no precision/recall
    np.savez(stats_only, mu=mu, sigma=sigma)
    res3 = evaluate_samples(samples, ref=str(stats_only))
    assert res3["fid"] == pytest.approx(res["fid"], rel=1e-5) and res3["precision"] is None
    assert "no arr_0" in res3["warning"]


def test_adm_reference_batch_errors(tmp_path):
    from erw_fast.evaluation.samples import evaluate_samples, load_reference

    cases = {
        "mu_only": (dict(mu=np.zeros(3)), r"mu_only.npz: sigma: missing \(mu without sigma\)"),
        "shapes": (dict(mu=np.zeros(3), sigma=np.eye(4)), r"mu \(3,\) and sigma \(4, 4\)"),
        "float": (dict(arr_0=np.zeros((4, 8, 8, 1), np.float32)), "arr_0: must be uint8"),
        "nothing": (dict(images=np.zeros(3)), r"nothing.npz: mu, sigma: missing, and no images in arr_0"),
    }
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=msg):
            load_reference(str(tmp_path / f"{name}.npz"))
    with pytest.raises(FileNotFoundError, match=r"--ref .*missing.npz: file not found"):
        load_reference(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"--ref .*inception_stats\.npz: reference mu is \(2048,\) but the digits"):
        evaluate_samples(np.zeros((4, 8, 8, 1), np.uint8), ref=str(tmp_path / "inception_stats.npz"))


# --------------------------------------------------------------------------------------------
# fd_<encoder>: the Fréchet distance in a target encoder's space
# --------------------------------------------------------------------------------------------
class _LinearEncoder(torch.nn.Module):
    """A 2x2-token encoder whose tokens are a fixed linear map of the image's quadrants: the mean-pooled
    feature is linear in the image, so FD has a closed form."""

    name, dim, token_grid = "toy", 3, 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).double())

    def forward(self, x):
        q = torch.nn.functional.avg_pool2d(x.double(), x.shape[-1] // 2).flatten(1)  # (B, 4) quadrant means
        return torch.stack([q * (i + 1) for i in range(4)], 1) @ self.w  # (B, 4 tokens, 3)


def test_fd_in_an_encoder_space_matches_the_closed_form():
    from erw_fast.metrics import EncoderFeatures, encoder_fd_stats, fd_name

    enc = _LinearEncoder()
    net = EncoderFeatures(enc)
    assert net.name == fd_name("toy") == "fd_toy" and net.pooling == "mean"
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.uniform(-0.5, 0.5, (300, 1, 4, 4)))
    s, delta = 0.5, torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    b = s * a + delta  # linear features: f(b) = s f(a) + f(delta)
    fa, g = net.features(a).double().numpy(), net.features(delta).double().numpy()[0]
    mu, cov = fa.mean(0), np.cov(fa, rowvar=False)
    expected = float(((s - 1) * mu + g) @ ((s - 1) * mu + g) + (1 - s) ** 2 * np.trace(cov))
    got = fid_from_images(b, encoder_fd_stats(enc, a), net)
    assert got == pytest.approx(expected, rel=1e-9)
    assert fid_from_images(a, encoder_fd_stats(enc, a), net) == pytest.approx(0.0, abs=1e-9)


def test_fd_uses_an_encoders_global_token_when_it_has_one():
    from erw_fast.metrics import EncoderFeatures

    enc = _LinearEncoder()
    enc.global_features = lambda x: torch.ones(len(x), 5)  # a CLS-style image embedding (DINOv2's, per Stein et al.)
    net = EncoderFeatures(enc)
    assert net.pooling == "global" and net.features(torch.zeros(2, 1, 4, 4)).shape == (2, 5)


def test_fd_digits_ssl_tells_digits_from_noise():
    from erw_fast.data.digits import load_digits
    from erw_fast.encoders import build_encoder
    from erw_fast.metrics import EncoderFeatures, encoder_fd_stats

    enc = build_encoder("digits-ssl")
    x, _ = load_digits(16)
    ref = encoder_fd_stats(enc, x)
    real = fid_from_images(x[:400], ref, EncoderFeatures(enc))
    noise = fid_from_images(torch.rand(400, 1, 16, 16) * 2 - 1, ref, EncoderFeatures(enc))
    assert real < 0.1 * noise

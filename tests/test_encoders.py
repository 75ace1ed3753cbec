"""Target encoders: the registry, the embedded digits encoder, grid checks."""
import pytest
import torch

from erw_fast.data.digits import load_digits
from erw_fast.encoders import ENCODERS, TargetEncoder, build_encoder, build_encoders, check_token_grid
from erw_fast.encoders.digits import ASSET


def test_registry_and_unknown_name():
    assert "digits-cnn" in ENCODERS
    with pytest.raises(ValueError, match="unknown encoder 'dinov3'.*digits-cnn"):
        build_encoder("dinov3")
    assert len(build_encoders("digits-cnn,digits-cnn")) == 2


def test_digits_encoder_tokens_frozen_and_small():
    enc = build_encoder("digits-cnn")
    assert isinstance(enc, TargetEncoder)
    assert enc.token_grid == 8 and enc.num_tokens == 64 and enc.dim == 64
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # stays frozen in eval mode
    x, y = load_digits(16)
    f = enc(x[:5])
    assert f.shape == (5, 64, 64) and f.dtype == torch.float32 and not f.requires_grad
    # an 8x8 input is resized to the 16x16 the encoder was trained on
    assert enc(torch.nn.functional.interpolate(x[:2], size=(8, 8))).shape == (2, 64, 64)
    import os

    assert os.path.getsize(ASSET) < 2_000_000
    blob = torch.load(ASSET, map_location="cpu", weights_only=True)
    assert blob["val_acc"] > 0.9


@pytest.mark.parametrize("name", ["digits-cnn", "digits-ssl"])
def test_digits_encoder_features_are_semantic(name):
    """Centred pooled tokens of same-class images are closer than those of different classes
    (digits-ssl too, though it never saw a label; measured: cnn 0.86 vs -0.09, ssl 0.51 vs -0.05)."""
    enc = build_encoder(name)
    x, y = load_digits(16)
    f = enc(x[:400]).mean(1)
    f = torch.nn.functional.normalize(f - f.mean(0), dim=-1)
    sim = f @ f.T
    same = y[:400, None] == y[None, :400]
    assert sim[same].mean() > sim[~same].mean() + 0.3


def test_token_grid_check():
    enc = build_encoder("digits-cnn")
    check_token_grid([enc], 64)
    with pytest.raises(ValueError, match="8x8 = 64 tokens but the model has 16 patch tokens"):
        check_token_grid([enc], 16)


# --------------------------------------------------------------------------------------------
# digits-ssl: the label-free default
# --------------------------------------------------------------------------------------------
def test_digits_ssl_is_the_default_with_the_same_interface():
    from erw_fast.encoders.digits import DEFAULT_DIGITS_ENCODER, SSL_ASSET
    from erw_fast.engine import TrainConfig
    from erw_fast.engine.config import resolve_config

    assert DEFAULT_DIGITS_ENCODER == "digits-ssl" and TrainConfig().encoder is None  # filled in per dataset
    assert resolve_config(TrainConfig(data="digits")).encoder == "digits-ssl" == resolve_config(TrainConfig(data="digits:5-9")).encoder
    enc, old = build_encoder("digits-ssl"), build_encoder("digits-cnn")
    assert enc.name == "digits-ssl" and old.name == "digits-cnn"
    assert (enc.token_grid, enc.num_tokens, enc.dim) == (old.token_grid, old.num_tokens, old.dim) == (8, 64, 64)
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in old.parameters())
    assert all(not p.requires_grad for p in enc.parameters())
    x, _ = load_digits(16)
    f = enc(x[:5])
    assert f.shape == (5, 64, 64) and f.dtype == torch.float32 and not torch.equal(f, old(x[:5]))
    import os

    assert os.path.getsize(SSL_ASSET) < 1_000_000
    blob = torch.load(SSL_ASSET, map_location="cpu", weights_only=True)
    assert blob["objective"] == "simclr (no labels)" and 0.1 < blob["val_acc"] <= 1.0
    assert not any(k.startswith("head.") for k in blob["state_dict"])  # no classifier was trained


def test_ssl_recipe_is_seeded_and_reads_no_label(monkeypatch):
    """Two runs give identical weights; shuffled labels give identical weights too (only the linear
    probe, run afterwards, reads them)."""
    import erw_fast.encoders.pretrain_digits_ssl as ssl

    x, y = load_digits(16)
    x, y = x[:80], y[:80]
    kw = dict(epochs=1, batch_size=32, verbose=False)

    def run(labels):
        monkeypatch.setattr(ssl, "load_digits", lambda size=16: (x.clone(), labels.clone()))
        return ssl.pretrain(**kw)

    (a, acc_a), (b, _) = run(y), run(y)
    c, _ = run(y[torch.randperm(80, generator=torch.Generator().manual_seed(1))])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k]), k
    assert 0.0 <= acc_a <= 1.0


def test_ssl_augment_keeps_range_and_background():
    from erw_fast.encoders.pretrain_digits_ssl import augment, nt_xent

    x, _ = load_digits(16)
    v = augment(x[:16], torch.Generator().manual_seed(0))
    assert v.shape == x[:16].shape and v.min() >= -1 and v.max() <= 1
    assert not torch.equal(v, augment(x[:16], torch.Generator().manual_seed(1)))  # seeded, random views
    blank = augment(torch.full((8, 1, 16, 16), -1.0), torch.Generator().manual_seed(0))
    assert blank.mean() < -0.9  # the background stays -1 (shifts, erasing; up to the pixel noise)
    z = torch.randn(8, 4)
    assert nt_xent(z, z, 0.2) < nt_xent(z, torch.randn(8, 4), 0.2)  # matching views: lower loss

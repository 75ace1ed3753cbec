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


def test_digits_encoder_features_are_semantic():
    """Pooled tokens of same-class images are closer than those of different classes."""
    enc = build_encoder("digits-cnn")
    x, y = load_digits(16)
    f = torch.nn.functional.normalize(enc(x[:400]).mean(1), dim=-1)
    sim = f @ f.T
    same = y[:400, None] == y[None, :400]
    assert sim[same].mean() > sim[~same].mean() + 0.1


def test_token_grid_check():
    enc = build_encoder("digits-cnn")
    check_token_grid([enc], 64)
    with pytest.raises(ValueError, match="8x8 = 64 tokens but the model has 16 patch tokens"):
        check_token_grid([enc], 16)

"""ERW's released checkpoints load as a drop-in. Nothing is downloaded: the tests build files in ERW's
layout themselves — its 2-D RoPE kept as persistent ``feat_rope.freqs_cos/sin`` buffers (an
independent re-implementation of EVA-02's VisionRotaryEmbeddingFast below), QK-norm LayerNorms
``attn.q_norm``/``attn.k_norm``, ``args`` as an argparse.Namespace — with random weights."""
import argparse
import math

import pytest
import torch

from erw_fast import SiT_models, load_checkpoint
from erw_fast.models.checkpoint import WarmupCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def eva02_rope_tables(head_dim: int, grid: int, theta: float = 10000.0):
    """EVA-02's fast 2-D RoPE as ERW registers it (dim = head_dim / 2 per axis, pt_seq_len = grid):
    per-axis frequencies theta^(-2i/dim), each repeated for an adjacent pair, the row's angles in the
    first half of the channels and the column's in the second, flattened row-major to (T, head_dim)."""
    dim = head_dim // 2
    inv = [theta ** (-(2 * i) / dim) for i in range(dim // 2)]
    cos, sin = [], []
    for r in range(grid):
        for c in range(grid):
            angles = [r * f for f in inv for _ in (0, 1)] + [c * f for f in inv for _ in (0, 1)]
            cos.append([math.cos(a) for a in angles])
            sin.append([math.sin(a) for a in angles])
    return torch.tensor(cos), torch.tensor(sin)


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(input_size=8, in_channels=4, num_classes=10, depth=3, z_dims=[16], projector_dim=32,
               encoder_depth=2, use_rope=True, qk_norm=True)
    cfg.update(kw)
    return SiT_models["SiT-T/2"](**cfg)


def _erw_file(tmp_path, model, name="0300000.pt", args=True, tables=None):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    head_dim = model.hidden_size // model.num_heads
    cos, sin = tables or eva02_rope_tables(head_dim, model.x_embedder.grid_size)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = cos, sin
    ckpt = {"model": sd, "ema": sd, "opt": {}, "steps": 300_000}
    if args:
        ckpt["args"] = argparse.Namespace(model="SiT-T/2", use_rope=True, qk_norm=True, encoder_depth=2,
                                          l2r_depth=2, cfg_prob=0.1, num_classes=10)
    path = tmp_path / name
    torch.save(ckpt, path)
    return str(path)


def test_erw_full_checkpoint_loads_and_computes_the_same(tmp_path):
    src = _model().eval()
    model = load_checkpoint(_erw_file(tmp_path, src)).eval()
    assert model.use_rope and model.qk_norm
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
    torch.testing.assert_close(model(x, t, y)[0], src(x, t, y)[0], rtol=0, atol=0)
    assert not any(k.startswith("feat_rope") for k in model.state_dict())  # never written back


def test_rope_is_inferred_from_the_tables_without_args(tmp_path):
    model = load_checkpoint(_erw_file(tmp_path, _model(), args=False), num_heads=3)
    assert model.use_rope


def test_a_different_rope_is_refused(tmp_path):
    src = _model()
    cos, sin = eva02_rope_tables(src.hidden_size // src.num_heads, src.x_embedder.grid_size, theta=100.0)
    with pytest.raises(ValueError, match="feat_rope.freqs_cos.*not erw_fast's 2-D RoPE"):
        load_checkpoint(_erw_file(tmp_path, src, tables=(cos, sin)))


def test_the_warmup_checkpoint_says_what_it_is(tmp_path):
    warm = _model(depth=2, encoder_depth=2)
    sd = {k: v for k, v in warm.state_dict().items() if not k.startswith("final_layer.")}
    path = tmp_path / "0100000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "steps": 100_000,
                "args": argparse.Namespace(use_rope=False, qk_norm=True)}, path)
    with pytest.raises(WarmupCheckpointError, match=r"warmup checkpoint \(blocks 0..1.*--warmup-from"):
        load_checkpoint(str(path))

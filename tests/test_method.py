"""The method: alignment losses, λ schedules, the transfer, the fused loss path."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from erw_fast.erw import (AlignmentSchedule, METHODS, alignment_from_hidden, alignment_loss,
                          get_method, transfer_keys, transfer_warmup)
from erw_fast.models import build_model
from erw_fast.transport import interpolate, velocity_loss, velocity_target

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def tiny(depth=4, encoder_depth=2, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=32, num_heads=2, depth=depth,
               encoder_depth=encoder_depth, z_dims=[16], projector_dim=24)
    cfg.update(kw)
    return build_model("SiT-T/2", **cfg)


# ---------------------------------------------------------------------------------------------
# alignment loss
# ---------------------------------------------------------------------------------------------
def test_cosine_loss_matches_reference():
    torch.manual_seed(0)
    zp, zt = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    ref = -(F.normalize(zp, dim=-1) * F.normalize(zt, dim=-1)).sum(-1).mean()
    assert torch.allclose(alignment_loss(zp, zt), ref, atol=1e-6)
    assert torch.allclose(alignment_loss(zp, zp), torch.tensor(-1.0), atol=1e-6)
    # lists: mean over encoders
    zp2, zt2 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    both = alignment_loss([zp, zp2], [zt, zt2])
    assert torch.allclose(both, (alignment_loss(zp, zt) + alignment_loss(zp2, zt2)) / 2, atol=1e-6)


def test_loss_depends_on_every_sample():
    """The public ERW warmup loss scores only the last sample of a batch; ours uses all of them."""
    torch.manual_seed(0)
    zp, zt = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    for kind in ("cosine", "ntxent"):
        base = alignment_loss(zp, zt, kind)
        for i in range(4):
            zt2 = zt.clone()
            zt2[i] = torch.randn(6, 8)
            assert not torch.allclose(alignment_loss(zp, zt2, kind), base), (kind, i)


def test_warmup_loss_depends_on_first_sample_target():
    model = tiny()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    t = torch.zeros(4)
    target = torch.randn(4, 16, 16)
    zs = model.forward_warmup(x, t, y, 2, force_drop_ids=torch.zeros(4, dtype=torch.bool))
    base = alignment_loss(zs, [target])
    target2 = target.clone()
    target2[0] += torch.randn(16, 16)
    assert not torch.allclose(alignment_loss(zs, [target2]), base)
    # and gradients reach the first sample's prediction
    xg = x.clone().requires_grad_(True)
    zs = model.forward_warmup(xg, t, y, 2, force_drop_ids=torch.zeros(4, dtype=torch.bool))
    alignment_loss(zs, [target]).backward()
    assert xg.grad[0].abs().sum() > 0


def test_ntxent_sanity():
    torch.manual_seed(0)
    zt = torch.randn(8, 4, 16)
    aligned = alignment_loss(zt * 3.0, zt, "ntxent", temperature=0.1)
    shuffled = alignment_loss(zt[torch.randperm(8)], zt, "ntxent", temperature=0.1)
    assert aligned < shuffled
    assert aligned >= 0 and aligned < 0.5  # near-perfect positives dominate
    # cosine agrees on the ordering
    assert alignment_loss(zt, zt) < alignment_loss(zt[torch.randperm(8)], zt)


def test_alignment_normalises_in_fp32_under_autocast():
    torch.manual_seed(0)
    zp = (torch.randn(2, 4, 8) * 1e3).bfloat16()
    zt = torch.randn(2, 4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = alignment_loss(zp, zt)
    assert loss.dtype == torch.float32
    ref = -(F.normalize(zp.float(), dim=-1) * F.normalize(zt.float(), dim=-1)).sum(-1).mean()
    assert torch.allclose(loss, ref, atol=1e-6)


def test_alignment_bad_inputs():
    with pytest.raises(ValueError, match="unknown alignment"):
        alignment_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), kind="l2")
    with pytest.raises(ValueError, match="token grid"):
        alignment_loss(torch.randn(1, 4, 3), torch.randn(1, 9, 3))


def test_fused_alignment_equals_unfused():
    model = tiny()
    torch.manual_seed(1)
    h = torch.randn(3, 16, 32, requires_grad=True)
    target = torch.randn(3, 16, 16)
    plain = alignment_from_hidden(model, h, [target], fused=False)
    g_plain = torch.autograd.grad(plain, [h, model.projectors[0][4].weight])
    fused = alignment_from_hidden(model, h, [target], fused="torch")
    g_fused = torch.autograd.grad(fused, [h, model.projectors[0][4].weight])
    assert torch.allclose(plain, fused, atol=1e-5)
    for a, b in zip(g_plain, g_fused):
        assert torch.allclose(a, b, atol=1e-5)
    # None follows the model's fused mode: off on a CPU model built with fused=None
    assert torch.allclose(alignment_from_hidden(model, h, [target]), plain)


# ---------------------------------------------------------------------------------------------
# λ schedule
# ---------------------------------------------------------------------------------------------
def test_schedule_values():
    s = AlignmentSchedule()
    assert s(0) == 6.0 and s(50_000) == 3.0 and s(100_000) == 1.5
    e = AlignmentSchedule("exp", lambda0=2.0, tau=1000)
    assert e(0) == 2.0 and math.isclose(e(1000), 2.0 / math.e)
    e_default = AlignmentSchedule("exp", lambda0=6.0, half_life=50_000)
    assert math.isclose(e_default(50_000), 3.0)
    c = AlignmentSchedule("constant", lambda0=0.5)
    assert c(0) == c(10**6) == 0.5
    assert AlignmentSchedule(half_life=100, lambda0=1.0)(300) == 0.125
    with pytest.raises(ValueError):
        AlignmentSchedule("cosine")
    with pytest.raises(ValueError):
        s(-1)


def test_methods():
    assert set(METHODS) == {"erw", "repa", "vanilla", "erw-nowarmup"}
    assert get_method("erw").warmup and get_method("erw").align
    assert get_method("erw").phases == ("warmup", "train") and get_method("repa").phases == ("train",)
    ctrl = get_method("erw-nowarmup")
    assert not ctrl.warmup and ctrl.align and ctrl.schedule == get_method("erw").schedule
    assert not get_method("repa").warmup and get_method("repa").align
    assert not get_method("vanilla").align
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dino")


# ---------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------
def test_transfer_exact_keys_and_values():
    warm = tiny(depth=2, encoder_depth=2, seed=1)
    with torch.no_grad():
        for p in warm.parameters():
            p.add_(torch.randn_like(p))  # make every warm tensor distinguishable from an init
    full = tiny(depth=4, encoder_depth=3, seed=2)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    keys = transfer_warmup(warm.state_dict(), full)
    expected = sorted(
        k for k in full.state_dict()
        if k == "pos_embed" or k.split(".")[0] in ("x_embedder", "t_embedder", "y_embedder", "projectors")
        or re.match(r"blocks\.[01]\.", k)
    )
    assert sorted(keys) == expected
    assert not any(k.startswith(("final_layer", "blocks.2", "blocks.3")) for k in keys)
    after = full.state_dict()
    for k in after:
        if k in keys:
            assert torch.equal(after[k], warm.state_dict()[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    # the transferred parameters are still the model's parameters (copy in place)
    assert full.blocks[0].attn.qkv.weight.data_ptr() == dict(full.named_parameters())["blocks.0.attn.qkv.weight"].data_ptr()
    assert transfer_keys(warm.state_dict()) == sorted(keys)


def test_transfer_strips_prefixes_and_rejects_mismatch():
    warm = tiny(depth=2, seed=1)
    full = tiny(depth=4, seed=2)
    sd = {f"module._orig_mod.{k}": v for k, v in warm.state_dict().items()}
    assert len(transfer_warmup(sd, full)) > 0
    with pytest.raises(ValueError, match="q_norm|missing|not in"):
        transfer_warmup(tiny(depth=2, qk_norm=True).state_dict(), full)
    with pytest.raises(ValueError, match="blocks"):
        transfer_warmup(tiny(depth=4).state_dict(), tiny(depth=2, encoder_depth=1))


# ---------------------------------------------------------------------------------------------
# transport
# ---------------------------------------------------------------------------------------------
def test_transport_convention():
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(interpolate(x, eps, torch.zeros(2)), x)
    assert torch.allclose(interpolate(x, eps, torch.ones(2)), eps)
    assert torch.equal(velocity_target(x, eps), eps - x)
    assert torch.allclose(velocity_loss(eps - x, x, eps), torch.tensor(0.0))
    pred = torch.zeros_like(x)
    assert torch.allclose(velocity_loss(pred, x, eps), (eps - x).square().mean())


def test_a_registered_schedule_and_loss_are_accepted_by_the_trainer(tmp_path):
    """Where ARCHITECTURE says new work goes: one registry entry is enough (config and CLI read the registries)."""
    from erw_fast.engine import TrainConfig, resolve_config
    from erw_fast.method.alignment import ALIGNMENT_LOSSES, register_alignment
    from erw_fast.method.schedules import SCHEDULES, register_schedule
    from erw_fast.train import build_parser

    register_schedule("linear-test")(lambda k, s: max(0.0, s.lambda0 * (1 - k / 1000)))
    register_alignment("l2-test")(lambda a, b, temperature: (a - b).square().sum(-1).mean())
    try:
        c = resolve_config(TrainConfig(lambda_schedule="linear-test", align_loss="l2-test"))
        assert c.lambda_schedule == "linear-test" and AlignmentSchedule("linear-test", 1.0)(500) == 0.5
        args = build_parser().parse_args(["--lambda-schedule", "linear-test", "--align-loss", "l2-test"])
        assert args.lambda_schedule == "linear-test"
    finally:
        SCHEDULES.pop("linear-test")
        ALIGNMENT_LOSSES.pop("l2-test")

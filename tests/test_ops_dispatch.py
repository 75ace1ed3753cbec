"""erw_fast.ops.resolve_fused: the one place a fused setting becomes "plain PyTorch or which backend"."""
import pytest
import torch

import erw_fast.ops as ops
from erw_fast.ops import _dispatch

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


@pytest.mark.parametrize("triton_ok", [True, False])
def test_every_setting(monkeypatch, triton_ok):
    monkeypatch.setattr(_dispatch, "_TRITON_OK", triton_ok)  # no GPU needed: only device.type is read
    auto_on_cuda = "auto" if triton_ok else False
    expected = {
        None: (False, auto_on_cuda),
        "auto": (False, auto_on_cuda),
        True: ("auto", "auto"),
        False: (False, False),
        "triton": ("triton", "triton"),
        "torch": ("torch", "torch"),
    }
    for setting, (on_cpu, on_cuda) in expected.items():
        assert ops.resolve_fused(setting, CPU) == on_cpu, setting
        assert ops.resolve_fused(setting, CUDA) == on_cuda, setting
        assert ops.resolve_fused(setting, META) == on_cpu, setting
        assert ops.resolve_fused(setting, "cuda:1") == on_cuda, setting  # a device string works too
    assert set(expected) == set(ops.FUSED_SETTINGS)


def test_result_types_are_exact():
    assert ops.resolve_fused(None, CPU) is False
    assert ops.resolve_fused(False, CUDA) is False


def test_default_never_probes_triton_off_cuda(monkeypatch):
    def boom():
        raise AssertionError("triton probed for a CPU device")

    monkeypatch.setattr(_dispatch, "triton_available", boom)
    assert ops.resolve_fused(None, CPU) is False and ops.resolve_fused("auto", CPU) is False


@pytest.mark.parametrize("bad", ["on", "off", "cuda", "AUTO", 1, 0, 1.0, "", [], object()])
def test_bad_setting_raises_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--fused"):
        ops.resolve_fused(bad, CPU)
    with pytest.raises(ValueError, match="--fused"):
        ops.check_fused(bad)


def test_results_are_op_backends():
    for setting in ops.FUSED_SETTINGS:
        for dev in (CPU, CUDA):
            r = ops.resolve_fused(setting, dev)
            assert r is False or r in ops.BACKENDS

"""Process-group set-up (``erw_fast.utils.distributed``), shared by train, sample, preprocess and
extract_features. The CUDA branch is exercised with CUDA calls recorded (no GPU here)."""
import pytest
import torch
import torch.distributed as dist

from erw_fast.utils import distributed as D


@pytest.fixture
def fake_two_gpu_rank1(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.setdefault("set_device", torch.device(dev)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    return calls


def test_nccl_group_gets_the_local_gpu_as_device_id(fake_two_gpu_rank1):
    d = D.setup_distributed("auto")
    assert (d.rank, d.world, d.device) == (1, 2, torch.device("cuda", 1))
    assert fake_two_gpu_rank1["set_device"] == torch.device("cuda", 1)
    init = fake_two_gpu_rank1["init"]
    assert init["backend"] == "nccl" and init["device_id"] == torch.device("cuda", 1)


def test_sampling_sets_the_device_before_the_group(fake_two_gpu_rank1, monkeypatch, tmp_path):
    """``python -m erw_fast.sample`` under torchrun: the same set-up (set_device, then device_id)."""
    from erw_fast.sampling import generate as G

    d, using = G._ranks(None, None, None)
    assert using and d.device == torch.device("cuda", 1)
    assert fake_two_gpu_rank1["set_device"] == torch.device("cuda", 1)
    assert fake_two_gpu_rank1["init"]["device_id"] == torch.device("cuda", 1)


def test_cpu_ranks_use_gloo_and_shards_need_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    assert D.setup_distributed("cpu", process_group=False).device == torch.device("cpu") and not seen
    D.setup_distributed("cpu")
    assert seen["init"] == {"backend": "gloo"}
    with pytest.raises(ValueError, match="--device"):
        D.pick_device("tpu")


def test_bad_device_strings_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        D.pick_device("cuda:x")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        D.pick_device("cuda:3")
    assert D.pick_device("cuda:0") == torch.device("cuda", 0)

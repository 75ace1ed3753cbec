"""Two gloo processes on CPU end with the same weights as one process with the same global batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from erw_fast.engine import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore:decoder_hidden_size")


def _config(out, **kw):
    # 2 warmup steps, a transfer, 3 full steps; label dropout high so drops certainly occur
    return TrainConfig(out=out, method="erw", warmup_steps=2, steps=3, batch_size=8, log_every=1, sample_steps=1,
                       samples_per_class=1, progress=False, seed=5, class_dropout=0.5, device="cpu", **kw)


def _worker(rank, world, port, out, kw=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        train(_config(out, **(kw or {})))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("kw", [{}, {"grad_accum": 2, "align_until": 1}], ids=["plain", "accum+align-stop"])
def test_two_gloo_processes_match_one(tmp_path, free_port, kw):
    """Also with gradient accumulation (DDP syncs only on the last micro-batch) and an alignment stop
    (the projectors get no gradient after it: DDP must not wait for them)."""
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(_config(one))
    finally:
        torch.set_num_threads(threads)
    if kw.get("align_until") is not None:  # the reference must stop aligning too
        ref = train(_config(str(tmp_path / "one-stop"), align_until=kw["align_until"]))
    mp.spawn(_worker, args=(2, free_port, two, kw), nprocs=2, join=True)
    a = torch.load(ref.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(two, "checkpoints", os.path.basename(ref.checkpoint)), map_location="cpu",
                   weights_only=True)
    assert a["steps"] == b["steps"] == 5
    assert a["args"]["batch_size"] == b["args"]["batch_size"] == 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert a["transfer"]["keys"] == b["transfer"]["keys"]

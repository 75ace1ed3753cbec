"""``--fsdp`` (FSDP2) on CPU: two gloo processes end with the weights of one unsharded process (same
global batch, same per-sample draws), resume exactly, and write full REPA-layout checkpoints that
resume without FSDP too."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from erw_fast.engine import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(out, **kw):
    base = dict(out=out, method="erw", warmup_steps=2, steps=3, batch_size=8, log_every=1, sample_steps=1,
                samples_per_class=1, progress=False, seed=7, class_dropout=0.5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, port, runs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        for kw in runs:
            train(_config(**kw))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load(out, step):
    return torch.load(os.path.join(out, "checkpoints", f"{step:07d}.pt"), map_location="cpu", weights_only=True)


def test_fsdp_two_processes_match_one_and_resume_exactly(tmp_path, free_port):
    one, full, part = (str(tmp_path / n) for n in ("one", "fsdp", "fsdp-resumed"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(one))
    finally:
        torch.set_num_threads(threads)
    runs = [dict(out=full, fsdp=True, grad_accum=2),
            dict(out=part, fsdp=True, grad_accum=2, stop_after=3),   # stops in phase 2, checkpoint at 3
            dict(out=part, fsdp=True, grad_accum=2, resume="auto")]
    mp.spawn(_worker, args=(2, free_port, runs), nprocs=2, join=True)
    a, b, c = _load(one, 5), _load(full, 5), _load(part, 5)
    assert a["opt"]["param_groups"][0]["params"] == b["opt"]["param_groups"][0]["params"]  # index-keyed, as AdamW
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(c["model"][k], b["model"][k]) and torch.equal(c["ema"][k], b["ema"][k]), k
    for i, st in b["opt"]["state"].items():
        torch.testing.assert_close(st["exp_avg"], a["opt"]["state"][i]["exp_avg"], rtol=1e-3, atol=1e-6)
    # an FSDP checkpoint resumes without FSDP, in one process
    more = train(_config(part, resume="auto", steps=4, threads=1))
    assert more.status == "finished" and more.steps == 6

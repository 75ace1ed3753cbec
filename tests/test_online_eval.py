"""``--eval-every``: FID (and digits accuracy) of the EMA model while training, logged as ``eval``
events; the samples are shared between ranks (the same images as one process); the evaluation's time
is not counted as training time."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from erw_fast.engine import TrainConfig, train
from erw_fast.utils.seeding import EVAL_SEED_OFFSET

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(out, **kw):
    base = dict(out=out, method="repa", steps=4, batch_size=8, log_every=1, sample_steps=3, samples_per_class=1,
                progress=False, seed=2, device="cpu", eval_every=2, eval_samples=20, eval_batch=7)
    base.update(kw)
    return TrainConfig(**base)


def _events(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"eval"' in line]


def test_online_eval_logs_fid_and_accuracy_outside_training_time(tmp_path, monkeypatch):
    import time

    from erw_fast.engine import online_eval

    real = online_eval.evaluate_online

    def slow(*a, **k):  # an evaluation that takes 2 s more: none of it may count as training time
        time.sleep(2.0)
        return real(*a, **k)

    monkeypatch.setattr(online_eval, "evaluate_online", slow)
    res = train(_config(str(tmp_path / "one"), threads=1))
    ev = [e for e in _events(res.out) if e.get("event") == "eval"]
    assert [e["step"] for e in ev] == [2, 4]
    assert all(e["fid"] > 0 and 0 <= e["sample_accuracy"] <= 1 and e["num_samples"] == 20 for e in ev)
    assert all(e["fd_digits-ssl"] > 0 for e in ev) and ev[0]["fd_digits-ssl"] != ev[1]["fd_digits-ssl"]
    assert res.summary["train_seconds"] < 2.0  # 4 tiny steps; the 2 x 2 s of evaluation are not in it


def test_bad_eval_settings(tmp_path):
    with pytest.raises(ValueError, match="--eval-samples"):
        train(_config(str(tmp_path / "x"), eval_samples=1))
    with pytest.raises(ValueError, match="--inception"):
        train(_config(str(tmp_path / "y"), data=str(tmp_path)))


def test_online_fd_matches_the_offline_metric(tmp_path):
    """The logged fd_digits-ssl is the Fréchet distance of the same samples in digits-ssl's space against
    all embedded digits, as ``python -m erw_fast.evaluate --encoder digits-ssl`` computes it."""
    from erw_fast.evaluation.samples import encoder_fd, sample_for_evaluation

    res = train(_config(str(tmp_path / "fd"), steps=2, threads=1))
    ev = [e for e in _events(res.out) if e.get("event") == "eval"][-1]
    assert ev["step"] == 2
    arr, _ = sample_for_evaluation(res.checkpoint, 20, sampler="sde", steps=3, seed=2 + EVAL_SEED_OFFSET, batch_size=7)
    assert encoder_fd(arr, "digits-ssl")["fd_digits-ssl"] == pytest.approx(ev["fd_digits-ssl"], rel=1e-4)


@pytest.mark.filterwarnings("ignore:dinov2-vit")
def test_online_fd_on_an_image_folder_needs_no_inception(tmp_path, tiny_dinov2_dir):
    """An image folder without --inception: each eval logs fd_dinov2-vit-b (against the folder's images)
    and fid null with the reason; vanilla (no target encoder) still needs --inception."""
    from test_imagefolder import make_folder

    folder = make_folder(tmp_path / "shapes", per_class=4)
    res = train(_config(str(tmp_path / "run"), data=f"imagefolder:{folder}", encoder="dinov2-vit-b",
                        encoder_path=tiny_dinov2_dir, model="SiT-D/4", steps=2, eval_samples=6, eval_batch=6,
                        projector_dim=32, threads=1))
    ev = [e for e in _events(res.out) if e.get("event") == "eval"]
    assert [e["step"] for e in ev] == [2] and ev[0]["fid"] is None and "--inception" in ev[0]["fid_note"]
    assert ev[0]["fd_dinov2-vit-b"] > 0 and "sample_accuracy" not in ev[0]
    with pytest.raises(ValueError, match="image folder without a target encoder needs --inception"):
        train(_config(str(tmp_path / "v"), data=f"imagefolder:{folder}", method="vanilla", encoder="none"))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        train(_config(out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_share_the_samples_and_agree_with_one(tmp_path, free_port):
    one = train(_config(str(tmp_path / "one"), threads=1))
    two = str(tmp_path / "two")
    mp.spawn(_worker, args=(2, free_port, two), nprocs=2, join=True)
    a = [e["fid"] for e in _events(one.out) if e.get("event") == "eval"]
    b = [e["fid"] for e in _events(two) if e.get("event") == "eval"]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (a, b)

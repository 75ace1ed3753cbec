"""``erw_fast.engine.Trainer``: the one training step. It creates no tensor from host values and reads
no device value back (on CUDA each is a host sync); a non-finite loss is recorded on the device with
the step it happened at."""
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from erw_fast.data import load_train_data
from erw_fast.engine import TrainConfig, Trainer, resolve_config
from erw_fast.engine.batches import BatchSource
from erw_fast.engine.run import build_net, load_encoders
from erw_fast.method import AlignmentSchedule, Objective
from erw_fast.utils.seeding import BatchIndexer

PKG = os.path.dirname(os.path.dirname(os.path.abspath(__import__("erw_fast").__file__)))
ERW_DIR = os.path.join(PKG, "erw_fast") + os.sep
# a read-back (``.item()``, ``float(t)``, ``bool(t)``) and a tensor made from Python data (``torch.tensor``)
WATCHED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default}


def _dispatch_wrapper(filename: str) -> bool:
    """torch's own frames between the caller and a dispatch mode (the dynamo-disable wrappers)."""
    return any(part in filename for part in (f"{os.sep}torch{os.sep}_dynamo{os.sep}", f"{os.sep}torch{os.sep}_compile.py",
                                             f"{os.sep}torch{os.sep}utils{os.sep}_python_dispatch.py"))


class HostSyncs(TorchDispatchMode):
    """Records watched ops called directly from code under ``roots`` (erw_fast by default). An op
    that torch itself issues (the CPU optimizer's own ``.item()`` calls inside torch.optim) has a
    torch frame innermost and does not count."""

    def __init__(self, roots=(ERW_DIR,)):
        super().__init__()
        self.roots, self.hits = tuple(roots), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WATCHED:
            frames = traceback.extract_stack()[:-1]  # without this __torch_dispatch__
            while frames and _dispatch_wrapper(frames[-1].filename):
                frames.pop()
            caller = frames[-1]
            if caller.filename.startswith(self.roots):
                self.hits.append((str(func), f"{caller.filename}:{caller.lineno}"))
        return func(*args, **(kwargs or {}))


def _trainer(method="erw", warm=False, **over):
    cfg = resolve_config(TrainConfig(method=method, batch_size=8, **over))
    data = load_train_data(cfg.data, torch.device("cpu"))
    encoders = load_encoders(cfg, data, torch.device("cpu"))
    model = build_net(cfg, data, [e.dim for e in encoders], warm=warm)
    sched = AlignmentSchedule(cfg.lambda_schedule, cfg.lambda0, cfg.half_life, cfg.tau)
    objective = Objective(model, cfg.l2r_depth if warm else None, method != "vanilla", sched, fused_align=False)
    trainer = Trainer(model, objective, encoders, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      amp=False, device="cpu")
    source = BatchSource(data, encoders, objective, BatchIndexer(data.num_samples, 8, 0), 0, 0.1, 0, "cpu")
    return trainer, source


@pytest.mark.parametrize("method,warm", [("erw", True), ("erw", False), ("vanilla", False)])
def test_train_step_makes_no_host_sync(method, warm):
    torch.set_num_threads(1)
    trainer, source = _trainer(method, warm)
    batches = [source.get(k) for k in range(3)]
    with HostSyncs() as mode:
        for k, b in enumerate(batches):
            out = trainer.train_step(b, k)
    assert mode.hits == [], mode.hits
    assert torch.isfinite(out.loss) and out.grad_norm > 0 and int(trainer.bad_step) == -1


def test_the_watcher_sees_a_sync_in_erw_fast_code():
    """The watcher is not blind: an ``.item()`` and a ``torch.tensor`` in erw_fast code are caught."""
    from erw_fast.engine import trainer as trainer_mod

    trainer, source = _trainer("vanilla")
    batch = source.get(0)
    real = trainer_mod.Trainer.loss

    def syncing_loss(self, b, k, runner=None):
        loss, align, vel, lam = real(self, b, k, runner)
        float(loss.detach())  # a read-back
        torch.tensor(k)  # a tensor from host data
        return loss, align, vel, lam

    trainer_mod.Trainer.loss = syncing_loss
    try:
        with HostSyncs(roots=(ERW_DIR, __file__)) as mode:
            trainer.train_step(batch, 0)
    finally:
        trainer_mod.Trainer.loss = real
    assert any("_local_scalar_dense" in f for f, _ in mode.hits)
    assert any("lift_fresh" in f for f, _ in mode.hits)


def test_nonfinite_loss_is_recorded_on_device_with_its_step():
    trainer, source = _trainer("repa")
    trainer.inject_nan_at = 12
    trainer._step.fill_(10)  # phase offset: global steps 10, 11, 12, 13
    for k in range(4):
        trainer.train_step(source.get(k), k, global_step=10 + k)
    assert int(trainer.bad_step) == 12


def test_cpu_attention_flops_are_counted():
    """torch's FlopCounter has no formula for the CPU attention kernel and counted it as 0; a step's
    FLOPs (warmup_cost, the study's budgets) left out every attention product on CPU."""
    from erw_fast.utils.flops import count_flops

    q = torch.randn(2, 3, 16, 8, requires_grad=True)
    fwd = 4 * 2 * 3 * 16 * 16 * 8  # QK^T and AV
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == fwd
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()) == 3.5 * fwd

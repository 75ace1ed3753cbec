"""erw_fast: fast, correct Embedded Representation Warmup (ERW) training for SiT/DiT.

Public surface: ``SiT`` (REPA/ERW-compatible backbone), ``SiT_models`` (size registry),
``build_model``, ``load_checkpoint``; ``TrainConfig`` and ``Trainer`` (the training engine, imported
on first use; the run itself is ``erw_fast.engine.train`` — ``erw_fast.train`` is the command line). Fused ops live in ``erw_fast.ops``, the method in
``erw_fast.method`` (``erw_fast.erw`` re-exports its functions), samplers in ``erw_fast.sampling``.
"""
from .models import SiT, SiT_models, build_model, load_checkpoint

__version__ = "0.1.0"
__all__ = ["SiT", "SiT_models", "TrainConfig", "Trainer", "build_model", "load_checkpoint", "__version__"]

_ENGINE = ("TrainConfig", "Trainer")  # not "train": erw_fast.train is the command-line module


def __getattr__(name):
    if name in _ENGINE:  # the engine pulls in tqdm, the method and the data layer: load it when asked
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'erw_fast' has no attribute {name!r}")

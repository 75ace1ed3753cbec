"""Training engine: the loop, optimizer and EMA, checkpoints, DDP, logging.

``train(TrainConfig(...))`` runs ERW (warmup → transfer → full training), REPA or vanilla SiT.
"""
from .config import DATA_DEFAULTS, MODEL_DEFAULTS, TrainConfig, resolve_config
from .loop import NonFiniteLossError, RunFolderError, TrainResult, train

__all__ = ["DATA_DEFAULTS", "MODEL_DEFAULTS", "NonFiniteLossError", "RunFolderError", "TrainConfig",
           "TrainResult", "resolve_config", "train"]

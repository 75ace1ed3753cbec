"""Training engine: ``train(TrainConfig(...))`` runs ERW (warmup → transfer → full training), REPA or
vanilla SiT; ``Trainer.train_step`` is the one training step.

config.py (settings + defaults) · run.py (a whole run) · phase.py (one phase's loop) · trainer.py
(Trainer, the step) · build.py (a phase's parts from its config) · batches.py (what a step reads) ·
checkpoint.py · fsdp.py · online_eval.py · align_probe.py · ema.py · logging.py · prefetch.py ·
samples.py (the run's sample grid) · signals.py · errors.py
"""
from .config import DATA_DEFAULTS, MODEL_DEFAULTS, TrainConfig, resolve_config
from .errors import NonFiniteLossError, RunFolderError
from .run import TrainResult, train
from .trainer import StepOutput, Trainer

__all__ = ["DATA_DEFAULTS", "MODEL_DEFAULTS", "NonFiniteLossError", "RunFolderError", "StepOutput", "TrainConfig",
           "TrainResult", "Trainer", "resolve_config", "train"]

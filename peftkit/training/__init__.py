"""peftkit.training: one training loop and what plugs into it (see docs/training.md)."""

from peftkit.training.callbacks import Callback, EarlyStopping, TrainerState, register_callback
from peftkit.training.config import RunConfig, TrainingConfig
from peftkit.training.gradients import register_gradient_hook
from peftkit.training.losses import LossInputs, register_loss
from peftkit.training.overrides import load_run_config
from peftkit.training.run import run_training
from peftkit.training.trainer import Trainer, TrainingDivergedError, TrainResult

__all__ = [
    "Callback",
    "EarlyStopping",
    "LossInputs",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "TrainingConfig",
    "TrainingDivergedError",
    "load_run_config",
    "register_callback",
    "register_gradient_hook",
    "register_loss",
    "run_training",
]

"""Training: configs and presets, losses, optimizer and schedule, the jitted step, the loop, metrics logs."""

from e2former_jax.training.config import (
  TRAIN_PRESETS,
  DataConfig,
  InitConfig,
  LossConfig,
  OptimConfig,
  RunConfig,
  TrainConfig,
  apply_overrides,
  dump_config,
  get_train_config,
  load_config,
)
from e2former_jax.training.loop import TrainResult, train
from e2former_jax.training.losses import loss_terms
from e2former_jax.training.optim import decay_mask, learning_rate, lr_factor, make_optimizer
from e2former_jax.training.step import TrainState, compiled_train_step, init_state

__all__ = [
  "DataConfig",
  "InitConfig",
  "LossConfig",
  "OptimConfig",
  "RunConfig",
  "TRAIN_PRESETS",
  "TrainConfig",
  "apply_overrides",
  "dump_config",
  "get_train_config",
  "load_config",
  "loss_terms",
  "decay_mask",
  "learning_rate",
  "lr_factor",
  "make_optimizer",
  "TrainState",
  "compiled_train_step",
  "init_state",
  "TrainResult",
  "train",
]

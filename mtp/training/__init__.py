"""Training: the loop (trainer), and beside it the reusable parts it is made of: the hooks a config asks for
(components), DeepSpeed config and optimizer groups (optim), process group (distributed), checkpoints with RNG state
(checkpoint), the run's progress (state), logging as hooks in a registry (loggers) and the memory profile (memory)."""

from mtp.training.optim import build_ds_config, lr_lambda, lr_schedule, split_param_groups
from mtp.training.trainer import Trainer, run_training

__all__ = ["Trainer", "build_ds_config", "lr_lambda", "lr_schedule", "run_training", "split_param_groups"]

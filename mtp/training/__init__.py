"""Training: the loop (trainer), and beside it the reusable parts it is made of: DeepSpeed config and optimizer
groups (optim), process group (distributed), checkpoints with RNG state (checkpoint), batches and evaluation
(evaluation), the run's progress (state) and logging as hooks (loggers)."""

from mtp.training.checkpoint import CHECKPOINTS
from mtp.training.evaluation import collate, evaluate_tasks
from mtp.training.optim import build_ds_config, lr_lambda, lr_schedule, split_param_groups
from mtp.training.trainer import Trainer, run_training

__all__ = ["CHECKPOINTS", "Trainer", "build_ds_config", "collate", "evaluate_tasks", "lr_lambda", "lr_schedule",
           "run_training", "split_param_groups"]

"""One place builds a run's hooks from its config, so that the trainer takes them and only loops: the algorithms
(the pruning method from mtp.pruning's registry, distillation) and the observers (the memory profile on every rank,
the loggers that `train.loggers` names from mtp.training.loggers' registry on rank 0)."""

from __future__ import annotations

from typing import Any

import torch

from mtp.config import ExperimentConfig
from mtp.distill import build_distillation
from mtp.hooks import Hook
from mtp.pruning import build_pruning
from mtp.training.loggers import build_loggers
from mtp.training.memory import MemoryProfiler


def build_algorithms(cfg: ExperimentConfig, max_steps: int, tasks: list[str], dtype: torch.dtype) -> list[Hook]:
    """The hooks that change what is trained: the pruning method of `pruning.method` and distillation."""
    return [*build_pruning(cfg.pruning, max_steps), *build_distillation(cfg.distill, tasks, dtype)]


def build_observers(cfg: ExperimentConfig, ds_config: dict[str, Any], rank: int) -> list[Hook]:
    """The hooks that only watch: the memory profile (every rank) and the loggers (rank 0)."""
    return [MemoryProfiler(), *(build_loggers(cfg, ds_config) if rank == 0 else [])]

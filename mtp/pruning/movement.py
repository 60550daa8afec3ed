"""Movement pruning (Sanh et al. 2020): M = top-v of learned scores S, trained straight through (dL/dS = dL/dM)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mtp.pruning.base import PruningSettings
from mtp.pruning.elementwise import MaskedLinear, ScopedElementwisePruning, ScopeSetting


class ScoreLearning(PruningSettings):
    """The keys of methods that learn a score S for every weight (movement, soft movement)."""

    version: ClassVar[int] = 2
    """2: the scores stop requiring a gradient once the masks are fixed (their gradient no longer counts in the
    clipping norm of the fixed-mask phase). A run without that phase (`finetune_ratio: 0`) trains as at version 1."""

    def recipe_version(self) -> int:
        return self.version if self.finetune_ratio > 0 else 1

    score_lr: float = Field(1e-2, gt=0.0)
    """Learning rate of movement scores."""


class MovementSettings(ScopeSetting, ScoreLearning):
    method: Literal["movement"] = "movement"


class MovementPruning(ScopedElementwisePruning):
    """Keeps the entries with the largest scores S; S starts at 0 and learns from g * W in its own optimizer group (one
    score parameter per encoder block)."""

    cfg: MovementSettings
    with_scores = True

    def criterion(self, m: MaskedLinear) -> torch.Tensor:
        return m.scores.detach()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": self.score_params, "lr": self.cfg.score_lr, "weight_decay": 0.0,
                 "name": "scores"}]

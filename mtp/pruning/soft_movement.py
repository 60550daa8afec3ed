"""Soft movement pruning (Sanh et al. 2020): M = 1[sigmoid(S) > tau] plus lambda_t * mean(sigmoid(S)) in the loss,
tau and lambda ramped by the cubic schedule; projected to the budget (global top-k of S) at the end."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from mtp.pruning.elementwise import Scope
from mtp.pruning.movement import MovementPruning, ScoreLearning


def sigmoid_sum(scores: torch.Tensor) -> torch.Tensor:
    """sum(sigmoid(S)): the regulariser's term of one encoder block's scores, in float32."""
    return torch.sigmoid(scores.float()).sum()


class SoftMovementSettings(ScoreLearning):
    method: Literal["soft_movement"] = "soft_movement"
    soft_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    """Final tau in M = 1[sigmoid(S) > tau] (ramped from 0 by the cubic schedule; Sanh et al.: 0.1)."""
    soft_lambda: float = Field(400.0, ge=0.0)
    """Final weight of mean(sigmoid(S)) in the loss (ramped with tau; Sanh et al.: 400)."""


class SoftMovementPruning(MovementPruning):
    """The masks follow a threshold on the scores, not a count: the size is reached through the regulariser and the
    final projection, which keeps the budget's top-k of all scores together."""

    cfg: SoftMovementSettings

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.fraction_before_cut: float | None = None  # kept blocks over dense where the masks are fixed, pre-cut
        for block in self.blocks:  # one term per encoder block: the sum over its six matrices' scores at once
            block.score_term = sigmoid_sum

    @property
    def scope(self) -> Scope:
        return "global"

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if self.cfg.soft_lambda == 0 or self.fixed:
            return None
        total = sum(block.aux for block in self.blocks if block.aux is not None)
        assert self.budget is not None
        return self.cfg.soft_lambda * self.progress() * total / self.budget.prunable

    def move_masks(self, step: int) -> None:
        self.threshold = self.cfg.soft_threshold * self.progress()
        # sigmoid(S) > tau  <=>  S > logit(tau): one comparison per entry, no sigmoid
        cut = -math.inf if self.threshold <= 0 else math.inf if self.threshold >= 1 else math.log(
            self.threshold / (1 - self.threshold))
        for m, scores in self.criteria():
            torch.gt(scores, cut, out=m.mask)

    def final_masks(self) -> None:
        """The projection to the budget; what the threshold kept just before it is recorded (once per run: one count
        per matrix read to the host)."""
        if self.fraction_before_cut is None:
            self.fraction_before_cut = self.kept_report(self.model)["kept_fraction"]
        super().final_masks()

    def final_report(self, model: nn.Module) -> dict[str, Any]:
        if not self.fixed:  # it does not reach the budget by itself
            self.final_masks()
        report = super().final_report(model)
        if self.fraction_before_cut is not None:
            # the size the threshold reached by itself over the target: 1 when λ landed on the budget, above it when
            # the projection had to cut the rest (what `mtp compare` warns about; rank reports the same key)
            report["kept_fraction_before_cut"] = self.fraction_before_cut
            report["expected_over_target"] = self.fraction_before_cut / report["budget_fraction"]
        return report

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fraction_before_cut": self.fraction_before_cut}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fraction_before_cut = state.get("fraction_before_cut")

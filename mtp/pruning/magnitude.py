"""Gradual magnitude pruning: M = top-v of |W|, v following the cubic schedule (Zhu & Gupta 2017)."""

from __future__ import annotations

from typing import Literal

import torch

from mtp.pruning.base import PruningSettings
from mtp.pruning.elementwise import ElementwisePruning, MaskedLinear, Scope


class MagnitudeSettings(PruningSettings):
    method: Literal["magnitude"] = "magnitude"
    scope: Scope = "per_matrix"
    """Element-wise top-k per matrix or over all prunable matrices at once."""


class MagnitudePruning(ElementwisePruning):
    """Keeps the largest |W| of every matrix (or of all of them)."""

    cfg: MagnitudeSettings
    with_scores = False

    @property
    def scope(self) -> Scope:
        return self.cfg.scope

    def criterion(self, m: MaskedLinear) -> torch.Tensor:
        return m.weight.detach().abs()

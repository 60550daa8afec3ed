"""Gradual magnitude pruning: M = top-v of |W|, v following the cubic schedule (Zhu & Gupta 2017)."""

from __future__ import annotations

from typing import Literal

import torch

from mtp.pruning.elementwise import MaskedLinear, ScopedElementwisePruning, ScopeSetting


class MagnitudeSettings(ScopeSetting):
    method: Literal["magnitude"] = "magnitude"


class MagnitudePruning(ScopedElementwisePruning):
    """Keeps the largest |W| of every matrix (or of all of them): no parameter of its own."""

    with_scores = False

    def criterion(self, m: MaskedLinear) -> torch.Tensor:
        return m.weight.detach().abs()

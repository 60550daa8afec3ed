"""Gradual magnitude pruning: M = top-v of |W|, v following the cubic schedule (Zhu & Gupta 2017)."""

from __future__ import annotations

from typing import Literal

from mtp.pruning.base import PruningSettings
from mtp.pruning.elementwise import ElementwisePruning, Scope


class MagnitudeSettings(PruningSettings):
    method: Literal["magnitude"] = "magnitude"
    scope: Scope = "per_matrix"
    """Element-wise top-k per matrix or over all prunable matrices at once."""


class MagnitudePruning(ElementwisePruning):
    """Keeps the largest |W| of every matrix (or of all of them)."""

    with_scores = False

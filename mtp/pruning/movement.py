"""Movement pruning (Sanh et al. 2020): M = top-v of learned scores S, trained straight through (dL/dS = dL/dM)."""

from __future__ import annotations

from typing import Literal

from mtp.pruning.elementwise import ElementwisePruning, Scope, ScoredSettings


class MovementSettings(ScoredSettings):
    method: Literal["movement"] = "movement"
    scope: Scope = "per_matrix"
    """Element-wise top-k per matrix or over all prunable matrices at once."""


class MovementPruning(ElementwisePruning):
    """Keeps the entries with the largest scores S; S starts at 0 and learns from g * W."""

    with_scores = True

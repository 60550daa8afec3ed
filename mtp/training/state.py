"""The run's progress, one object: what a checkpoint keeps and results.json reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Optimizer steps done, tokens seen, wall time before this process, and the histories of loss and dev scores."""

    step: int = 0
    tokens_seen: int = 0
    prior_wall: float = 0.0
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, Any] = field(default_factory=dict)
    batches_per_task: dict[str, int] | None = field(default_factory=dict)
    """Micro-batches each task gave to every rank so far (its exposure); None for a run resumed from a checkpoint
    made before the count existed (its count would be partial)."""
    started: float = field(default_factory=time.time)

    @property
    def wall_time(self) -> float:
        """Seconds of training over every process of the run (resumes included)."""
        return self.prior_wall + time.time() - self.started

    def checkpoint(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "wall_time": self.wall_time,
                "eval_history": self.eval_history, "loss_history": self.loss_history,
                "batches_per_task": self.batches_per_task}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        return cls(step=saved["step"], tokens_seen=saved["tokens_seen"], prior_wall=saved["wall_time"],
                   eval_history=saved["eval_history"], loss_history=saved["loss_history"],
                   batches_per_task=None if saved.get("batches_per_task") is None
                   else dict(saved["batches_per_task"]))

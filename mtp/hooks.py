"""The one interface through which training algorithms (pruning methods) plug into the trainer.

The trainer calls these events and nothing else; it never knows which algorithm runs.
Order within one training run:

    on_phase(phase)                   the trainer enters a phase: model_build, engine_setup, train, evaluation,
                                      checkpoint, final_save (the memory profile listens)
    setup(model)                      before DeepSpeed wraps the model: may replace modules
    param_groups(model)               optimizer groups with their own learning rates
    [resume] load_state_dict(state)   after the DeepSpeed checkpoint is loaded
    on_train_start(step, max_steps)   the loop starts (at 0, or at the resumed step)
    loop over optimizer steps:
        batch_loss(task, batch, outputs, loss)  rewrites each micro-batch's task loss (distillation)
        extra_loss(model, step)       added to each micro-batch's loss (regularisers, Lagrangians)
        on_optimizer_step(model, step)  once per optimizer step, after DeepSpeed's step
        metrics()                     scalars for TensorBoard at log steps (on every rank)
        on_log(step, scalars)         every scalar of the log step: the trainer's and every hook's metrics()
        on_evaluate(step, results)    after every evaluation on the dev sets
        state_dict()                  into every checkpoint
    on_train_end(model) -> dict       final projection / report: the keys it adds to results.json
    (then the final evaluation, which calls on_evaluate once more)
    on_results(results)               the run's results (results.json), finished or stopped

Logging (TensorBoard, results.json, the progress bar) and the memory profile run on the same events
(mtp.training.loggers, mtp.training.memory); mtp.training.components builds every hook of a run from its config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Hook:
    """Base class: every event is a no-op. Subclasses override what they need."""

    name = "hook"

    def on_phase(self, phase: str) -> None:
        """The trainer enters `phase` (model_build, engine_setup, train, evaluation, checkpoint, final_save)."""

    def setup(self, model: nn.Module) -> None:
        """Prepare the model before DeepSpeed sees it (wrap layers, add parameters)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups owned by this hook (their params leave the default groups); a group with
        `"constant_lr": True` keeps its learning rate (no warmup, no decay)."""
        return []

    def batch_loss(self, task: str, batch: dict[str, torch.Tensor], outputs: dict[str, Any],
                   loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss given its task, inputs and the model's outputs (default: `loss` unchanged)."""
        return loss

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """A term added to the training loss of every micro-batch, or None."""
        return None

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Advance schedules, masks, multipliers: called once per optimizer step (step counts from 1)."""

    def metrics(self) -> dict[str, float]:
        """Scalars to log (TensorBoard tag -> value); called on every rank (it may gather ZeRO-3 partitions)."""
        return {}

    def on_train_start(self, step: int, max_steps: int) -> None:
        """The training loop starts at `step` (0, or the step a resumed run continues from) of `max_steps`."""

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        """Every scalar of a log step (tag -> value), the same on all ranks."""

    def on_evaluate(self, step: int, results: dict[str, Any]) -> None:
        """Dev results of every task (the same on all ranks), after each evaluation."""

    def on_results(self, results: dict[str, Any]) -> None:
        """The run's results (what results.json holds) when the loop ends, finished or stopped early."""

    def state_dict(self) -> dict[str, Any]:
        """Picklable state saved in every checkpoint (parameters already live in the DeepSpeed state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` on resume."""

    def on_train_end(self, model: nn.Module) -> dict[str, Any]:
        """Finish (e.g. project to the budget) and return the keys this hook adds to results.json (a pruning method:
        `{"pruning": report}`, the record `mtp.run_folder.RunResults` reads)."""
        return {}

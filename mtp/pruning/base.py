"""What every pruning method shares: its config's common keys, the budget, the cubic schedule, the prunable maps,
the layer interface (with its dense fold and compact form) and the hook base with its kept-parameter report."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mtp.hooks import Hook
from mtp.model import PRUNABLE_BY_ARCH, encoder_layers, parameter_counts
from mtp.schema import ConfigError, Strict

# ---------------------------------------------------------------- host reads

# MTP_ACCELERATOR_PATHS=1 takes an accelerator's paths on a CPU for a whole run (bench/behaviour_digest.py's guard
# of changes that only an accelerator would run)
_ACCELERATOR_PATHS = os.environ.get("MTP_ACCELERATOR_PATHS", "") == "1"


def host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether a hook may read a value of `tensor` back to the host (`item`, `nonzero`, a count) at no cost: on a CPU
    operators run synchronously, so a read waits for nothing; on an accelerator it waits for every queued kernel.
    Methods take a sync-free path (the same masks, computed without reads) where this is False."""
    return tensor.device.type == "cpu" and not _ACCELERATOR_PATHS


@contextmanager
def accelerator_paths() -> Iterator[None]:
    """Take the sync-free paths of an accelerator also on a CPU (bench/step_overhead.py's proxy, tests)."""
    global _ACCELERATOR_PATHS
    before, _ACCELERATOR_PATHS = _ACCELERATOR_PATHS, True
    try:
        yield
    finally:
        _ACCELERATOR_PATHS = before


# ---------------------------------------------------------------- config


class PruningSettings(Strict):
    """The keys of every method; a method's settings add its own (a key of another method is an error)."""

    version: ClassVar[int] = 1
    """The method's version: raised when a change to its code changes what a run trains. A run trained at another
    version is stale (its fingerprint differs); version 1 leaves today's fingerprints as they are."""

    def recipe_version(self) -> int:
        """The version that these settings train with: `version`, or lower where the change does not reach them."""
        return self.version

    method: str = "none"
    budget: float = Field(1.0, gt=0.0)
    """Encoder budget B: a fraction of the dense encoder-block parameters (<= 1) or a parameter count (> 1)."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Dense warmup w0, as a fraction of the optimizer steps."""
    cooldown_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Cool-down w1 at the final density (or Lagrangian target), as a fraction of the steps."""
    finetune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """The last fraction of the steps trains the weights at fixed masks or ranks (fixed when it starts: the final
    top-k, soft movement's projection, rank's projection to the budget); the schedule ends before it."""

    @model_validator(mode="after")
    def _check(self) -> PruningSettings:
        if self.warmup_ratio + self.cooldown_ratio + self.finetune_ratio >= 1.0:
            raise ValueError("pruning.warmup_ratio + pruning.cooldown_ratio + pruning.finetune_ratio must be below 1")
        if self.budget > 1.0 and self.budget != int(self.budget):
            raise ValueError(f"pruning.budget: {self.budget} is neither a fraction (<= 1) nor a parameter count")
        if self.method != "none" and self.budget == 1.0:
            raise ValueError(f"pruning.budget: method {self.method!r} needs a budget below the dense size")
        return self


class NoPruning(PruningSettings):
    """Dense training: the common keys are accepted (a comparison sets them for every run) and change nothing."""

    method: Literal["none"] = "none"


# ---------------------------------------------------------------- budget and schedule


@dataclass(frozen=True)
class Budget:
    """The encoder budget B and what it leaves for the prunable matrices (all in parameters)."""

    dense_blocks: int
    prunable: int
    target: int

    @property
    def non_prunable(self) -> int:
        return self.dense_blocks - self.prunable

    @property
    def prunable_allowance(self) -> int:
        return self.target - self.non_prunable

    @property
    def density(self) -> float:
        """v: the kept fraction of prunable weights for element-wise pruning."""
        return self.prunable_allowance / self.prunable


def make_budget(counts: dict[str, int], budget: float) -> Budget:
    """B from a fraction of the dense encoder blocks (<= 1) or an absolute count (> 1); refuses infeasible ones."""
    dense = counts["encoder_blocks"]
    target = int(math.floor(budget * dense)) if budget <= 1.0 else int(budget)
    non_prunable = dense - counts["prunable"]
    if target > dense:
        raise ConfigError(f"pruning.budget: {target:,} parameters exceeds the dense encoder blocks ({dense:,})")
    if target < non_prunable:
        raise ConfigError(f"pruning.budget: {target:,} parameters is infeasible: the non-prunable block parameters "
                          f"(biases, LayerNorms) alone are {non_prunable:,} ({non_prunable / dense:.4f} of {dense:,})")
    return Budget(dense_blocks=dense, prunable=counts["prunable"], target=target)


def cubic_schedule(step: int, total: int, warmup: int, cooldown: int, start: float, end: float) -> float:
    """Sanh et al.'s cubic schedule: `start` until `warmup`, `end` for the last `cooldown` steps, cubic between."""
    if step <= warmup:
        return start
    if step > total - cooldown:
        return end
    span = max(1, total - warmup - cooldown)
    progress = min(1.0, (step - warmup) / span)
    return end + (start - end) * (1.0 - progress) ** 3


# ---------------------------------------------------------------- layers


class PrunableLayer(nn.Module):
    """A prunable linear map swapped in for nn.Linear, with its merge beside it: `fold` gives the dense weight from a
    saved state (for plain transformers), `compact` its small stored form, `from_compact` the inference module.

    A method that acts on a block rather than on one map (a head spans the query, key, value and output maps, an FFN
    unit the two FFN maps) is given each map's kind when it builds its layers (`replace_prunable`), and may change a
    whole block once all of its maps have their inference modules (`compact_block`)."""

    compact_format: ClassVar[str]
    """The name of the compact form in compact.json (a format written is read back by the layer that owns it)."""
    state_suffixes: ClassVar[tuple[str, ...]]
    """The layer's own state keys (after `path.`) that the dense fold replaces by `weight`."""
    shrinks_blocks: ClassVar[bool] = False
    """Whether the compact form is a stock block at smaller shapes (whole heads and FFN units removed): the export
    then writes its Hugging Face encoder at those shapes (mtp/pruned_encoder.py), not a dense fold with zeros."""

    @classmethod
    def fold(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> torch.Tensor:
        """The dense weight of the layer saved under `path` in `state`."""
        raise NotImplementedError

    @classmethod
    def compact(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> dict[str, torch.Tensor]:
        """The compact tensors of the layer saved under `path` (keys under `path.`; the bias is stored apart)."""
        raise NotImplementedError

    @classmethod
    def from_compact(cls, tensors: dict[str, torch.Tensor], path: str, bias: torch.Tensor | None,
                     sparse_compute: bool) -> nn.Module:
        """The inference module for the compact tensors under `path` (taken out of `tensors`)."""
        raise NotImplementedError

    @classmethod
    def compact_block(cls, block: nn.Module, model_type: str) -> None:
        """Change one encoder block (a transformers layer) whose prunable maps are all inference modules now, e.g. an
        attention left with no heads; nothing by default."""


def prunable_modules(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(matrix type, layer index, module) for the six prunable maps of every block."""
    found = []
    for idx, layer in enumerate(encoder_layers(model)):
        for kind, path in PRUNABLE_BY_ARCH[model.model_type].items():
            found.append((kind, idx, layer.get_submodule(path)))
    return found


def replace_prunable(model: nn.Module, make: Any) -> None:
    """Swap every prunable nn.Linear of the encoder for `make(linear, layer_index, kind)` (kind: query, key, value,
    attn_out, ffn_in, ffn_out)."""
    for idx, layer in enumerate(encoder_layers(model)):
        for kind, path in PRUNABLE_BY_ARCH[model.model_type].items():
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            setattr(parent, child, make(getattr(parent, child), idx, kind))


# ---------------------------------------------------------------- the hook


def first_step_at_budget(cfg: PruningSettings, total_steps: int) -> int:
    """The first optimizer step whose target is the budget: evaluations from there on score a model of its final
    size (earlier ones, mid-ramp, favour schedules that have pruned less so far)."""
    if cfg.method == "none":
        return 0
    hook = PruningHook(cfg, total_steps)
    return next(step for step in range(total_steps + 1) if hook.schedule(step, 1.0, 0.0) == 0.0)


class PruningHook(Hook):
    """Shared by all methods: budget, schedule position, reports of kept parameters."""

    name = "pruning"

    def __init__(self, cfg: PruningSettings, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup = int(round(cfg.warmup_ratio * total_steps))
        self.cooldown = int(round(cfg.cooldown_ratio * total_steps))
        # the schedule (warmup, ramp, cool-down) ends here; the steps after it train at fixed masks or ranks
        self.schedule_end = total_steps - int(round(cfg.finetune_ratio * total_steps))
        self.step = 0
        self.fixed = False  # masks or ranks fixed for the final fine-tuning phase
        self.budget: Budget | None = None

    def setup(self, model: nn.Module) -> None:
        self.budget = make_budget(parameter_counts(model), self.cfg.budget)
        self.model = model

    def kept_report(self, model: nn.Module) -> dict[str, Any]:
        """Kept parameters: total (as the budget counts them), per layer, per matrix type."""
        per_layer: dict[str, int] = {}
        per_type: dict[str, int] = {}
        for kind, idx, module in prunable_modules(model):
            kept = self.kept_in(module)
            per_layer[str(idx)] = per_layer.get(str(idx), 0) + kept
            per_type[kind] = per_type.get(kind, 0) + kept
        assert self.budget is not None
        kept_blocks = int(round(sum(per_type.values()))) + self.budget.non_prunable
        return {"method": self.cfg.method, "budget": self.budget.target, "budget_fraction":
                self.budget.target / self.budget.dense_blocks, "dense_blocks": self.budget.dense_blocks,
                "kept_blocks": kept_blocks, "kept_fraction": kept_blocks / self.budget.dense_blocks,
                "within_budget": kept_blocks <= self.budget.target, "non_prunable": self.budget.non_prunable,
                "kept_prunable_per_layer": per_layer, "kept_prunable_per_type": per_type}

    def kept_in(self, module: nn.Module) -> float:
        raise NotImplementedError

    def final_report(self, model: nn.Module) -> dict[str, Any]:
        """Reach the budget if the method has not yet (a final projection) and report what the model keeps (what
        results.json holds under `pruning`: mtp.run_folder.PruningReport)."""
        raise NotImplementedError

    def on_train_end(self, model: nn.Module) -> dict[str, Any]:
        return {"pruning": self.final_report(model)}

    def kept_metrics(self) -> dict[str, float]:
        """TensorBoard scalars of the kept parameters: total, per layer, per matrix type."""
        report = self.kept_report(self.model)
        out = {"pruning/kept_blocks": report["kept_blocks"], "pruning/kept_fraction": report["kept_fraction"],
               "pruning/budget": report["budget"]}
        out |= {f"pruning/kept_per_layer/{k}": v for k, v in report["kept_prunable_per_layer"].items()}
        out |= {f"pruning/kept_per_type/{k}": v for k, v in report["kept_prunable_per_type"].items()}
        return out

    def schedule(self, step: int, start: float, end: float) -> float:
        """The cubic schedule from `start` to `end` over this run's warmup, ramp and cool-down."""
        return cubic_schedule(step, self.schedule_end, self.warmup, self.cooldown, start, end)

    def in_fixed_phase(self, step: int) -> bool:
        return step > self.schedule_end

    def enter_fixed_phase(self) -> None:
        """Fix the masks or ranks at the budget for the rest of the run: what a run does at the first step past its
        schedule, and what a bench that times the fixed phase calls once the engine is built."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fixed": self.fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", 0)
        self.fixed = state.get("fixed", False)

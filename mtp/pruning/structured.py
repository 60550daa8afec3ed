"""Structured pruning: whole attention heads and FFN units leave the encoder, so that the pruned model is physically
smaller (fewer heads, narrower FFNs) and faster in any runtime. One set of group masks is shared by every task.

A head spans rows of the query, key and value maps (and their biases) and columns of the attention output map; an
FFN unit a row (and bias) of the FFN input map and a column of the FFN output map. Each map is a `GroupMaskedLinear`
whose 0/1 mask runs over its rows or its columns; the hook writes the same group mask into the maps of a block.
Groups are ranked by their importance per parameter, compared across heads and units and across layers (within each
kind when `attention_share` gives the heads their share), and the most important ones are kept while they fit the cubic
schedule's allowance,
so that every step's model is within that step's size and the final one within B, short of it by less than one
group's cost. A block left with no heads computes no attention; one left with no FFN units computes no FFN: only
the sublayer's output bias and LayerNorm remain (what the budget counts as the block's fixed part).

Importance (`pruning.criterion`):
- `taylor` (default): the first-order estimate of what removing a group costs the training loss (Molchanov et al.
  2019; Michel et al. 2019 for heads): |dL/dg| for a gate g = 1 on the group's output (a head's columns of the
  attention output map, a unit's column of the FFN output map), per optimizer step, summed over the ranks and
  averaged along the run (an exponential moving average, `taylor_decay`). The gate multiplies the weight, not the
  activations, so it costs one weight-sized product; it is read only while groups are being chosen.
- `magnitude`: the mean |W| over the group's weights (no data).
docs/pruning.md gives the measurement that chose the default.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mtp.model import encoder_layers
from mtp.pruning.base import PrunableLayer, PruningHook, PruningSettings, prunable_modules, replace_prunable
from mtp.zero3 import full_shape, gathered

# which side of each map a group occupies: rows (output features) or columns (input features)
ROWS_OF = ("query", "key", "value", "ffn_in")
COLUMNS_OF = ("attn_out", "ffn_out")
HEAD_MAPS = ("query", "key", "value", "attn_out")
UNIT_MAPS = ("ffn_in", "ffn_out")


class StructuredSettings(PruningSettings):
    method: Literal["structured"] = "structured"
    criterion: Literal["taylor", "magnitude"] = "taylor"
    """How groups are ranked: first-order Taylor estimate of the loss change (`taylor`), or mean |W| (`magnitude`)."""
    taylor_decay: float = Field(0.99, ge=0.0, lt=1.0)
    """The moving average's decay per optimizer step for `taylor` (0.99: about the last 100 steps)."""
    attention_share: float | None = Field(0.3333, ge=0.0, le=1.0)
    """The share of the kept groups' parameters that goes to attention heads (each kind then ramps on its own cubic
    schedule and is chosen by importance within its kind; what the heads leave goes to FFN units). The default is a
    BERT-style block's own share (4d^2 of 12d^2 with FFN width 4d); None: heads and units compete on importance per
    parameter alone (the method before the share, which kept too few heads: docs/pruning.md)."""


class GroupMaskedLinear(PrunableLayer):
    """y = (W x + b) * m with a 0/1 mask m over the rows (output features: the bias is masked with them; for finite
    outputs the same values as (W * m) x + b * m) or (W * m) x + b with one over the columns (input features); the
    compact form keeps the unmasked rows or columns."""

    compact_format = "structured"
    state_suffixes = ("group_mask", "group_rows")
    shrinks_blocks = True

    def __init__(self, linear: nn.Linear, rows: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = rows
        size = full_shape(linear.weight)[0 if rows else 1]
        self.register_buffer("group_mask", torch.ones(size, dtype=linear.weight.dtype, device=linear.weight.device))
        self.register_buffer("group_rows", torch.tensor(rows, device=linear.weight.device))  # saved: export reads it
        self.group_size = 1
        self.taylor: torch.Tensor | None = None  # set by the hook while it chooses groups: |dL/dg| per group, summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.group_mask
        if mask.dtype != self.weight.dtype:  # a no-op `to` is still an operator call on every pass
            mask = mask.to(self.weight.dtype)
        if self.rows:  # masking the output masks the rows and the bias in one multiply, with the same values
            return F.linear(x, self.weight, self.bias) * mask
        if self.taylor is not None and self.training and torch.is_grad_enabled():
            gate = torch.ones_like(mask, requires_grad=True)  # dL/dgate_j = sum_i W_ij dL/dW'_ij: removing column j
            gate.register_hook(self._add_taylor)
            mask = mask * gate
        return F.linear(x, self.weight * mask, self.bias)

    def _add_taylor(self, grad: torch.Tensor) -> None:
        assert self.taylor is not None
        self.taylor += grad.detach().float().view(-1, self.group_size).sum(1).abs()

    @staticmethod
    def _is_rows(state: dict[str, torch.Tensor], path: str) -> bool:
        return bool(state[f"{path}.group_rows"])

    @classmethod
    def fold(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> torch.Tensor:
        """Zeros in the removed rows or columns (a removed row's bias stays: its column partner is zero, so nothing
        of it reaches the output)."""
        weight, mask = state[f"{path}.weight"], state[f"{path}.group_mask"].to(state[f"{path}.weight"].dtype)
        return weight * (mask[:, None] if cls._is_rows(state, path) else mask)

    @classmethod
    def compact(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> dict[str, torch.Tensor]:
        """The kept rows or columns of the weight, their indices, and which side they are (1: rows)."""
        rows = cls._is_rows(state, path)
        kept = torch.nonzero(state[f"{path}.group_mask"] > 0).flatten()
        weight = state[f"{path}.weight"]
        values = weight[kept] if rows else weight[:, kept]
        return {f"{path}.values": values.contiguous(), f"{path}.kept": kept.to(torch.int64),
                f"{path}.rows": torch.tensor([int(rows)], dtype=torch.int64)}

    @classmethod
    def from_compact(cls, tensors: dict[str, torch.Tensor], path: str, bias: torch.Tensor | None,
                     sparse_compute: bool) -> nn.Module:
        """A plain nn.Linear of the kept shape (the same module whatever `sparse_compute` says)."""
        values, kept = tensors.pop(f"{path}.values"), tensors.pop(f"{path}.kept")
        rows = bool(tensors.pop(f"{path}.rows")[0])
        if rows and bias is not None:
            bias = bias[kept]
        linear = nn.Linear(values.shape[1], values.shape[0], bias=bias is not None, dtype=values.dtype)
        linear.load_state_dict({"weight": values} | ({"bias": bias} if bias is not None else {}))
        return linear

    @classmethod
    def compact_block(cls, block: nn.Module, model_type: str) -> None:
        """A block left with no heads computes no attention (its output map adds only its bias)."""
        attention = block.attention.self
        if attention.query.out_features == 0:
            # imported here, not at the top: pruned_encoder imports transformers' modeling code (seconds), which
            # every `mtp` command would pay through the method registry that the config reads
            from mtp.pruned_encoder import NoHeads

            block.attention.self = NoHeads()


class StructuredPruning(PruningHook):
    """Heads and FFN units kept by their importance per parameter along the cubic schedule, to the budget (heads and
    units each to their own share when `attention_share` is set)."""

    cfg: StructuredSettings

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        replace_prunable(model, lambda linear, _idx, kind: GroupMaskedLinear(linear, rows=kind in ROWS_OF))
        config = model.encoder.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.maps: list[dict[str, GroupMaskedLinear]] = [{} for _ in encoder_layers(model)]
        for kind, idx, module in prunable_modules(model):
            self.maps[idx][kind] = module
        hidden = config.hidden_size
        self.units = full_shape(self.maps[0]["ffn_in"].weight)[0]
        self.head_cost = 4 * hidden * self.head_dim + 3 * self.head_dim  # Q, K, V rows and biases, O columns
        self.unit_cost = 2 * hidden + 1  # an FFN input row and bias, an FFN output column
        layers = len(self.maps)
        self.removable = layers * (self.heads * self.head_cost + self.units * self.unit_cost)
        assert self.budget is not None
        self.fixed_part = self.budget.dense_blocks - self.removable  # LayerNorms and the output maps' biases
        self.allowance = self.budget.target - self.fixed_part
        self.all_heads_cost = layers * self.heads * self.head_cost
        share = self.cfg.attention_share
        # the share, clipped to what the kinds can hold: no more than every head, and at least what every unit leaves
        self.head_allowance = None if share is None else min(
            max(int(share * self.allowance), self.allowance - (self.removable - self.all_heads_cost)),
            self.all_heads_cost)
        device = self.maps[0]["ffn_out"].group_mask.device
        self.kept_heads = torch.ones(layers, self.heads, dtype=torch.bool, device=device)  # on the device: choosing
        self.kept_units = torch.ones(layers, self.units, dtype=torch.bool, device=device)  # groups never waits on it
        self.taylor_average: torch.Tensor | None = None  # heads then units of every layer, per parameter
        self._probe(self.cfg.criterion == "taylor")

    # ------------------------------------------------------------ importance and selection
    def _probe(self, on: bool) -> None:
        """Attach (or drop) the Taylor accumulators of the output maps: heads' columns in groups of head_dim."""
        for maps in self.maps:
            for kind, group_size in (("attn_out", self.head_dim), ("ffn_out", 1)):
                module = maps[kind]
                module.group_size = group_size
                size = module.in_features // group_size
                module.taylor = torch.zeros(size, device=module.group_mask.device) if on else None

    def _step_taylor(self) -> None:
        """Fold this step's |dL/dg| (summed over the ranks) into the moving average and reset the accumulators."""
        outputs = [module for maps in self.maps for module in (maps["attn_out"], maps["ffn_out"])]
        if any(m.taylor is None for m in outputs):
            return
        heads = torch.stack([maps["attn_out"].taylor for maps in self.maps]).flatten() / self.head_cost
        units = torch.stack([maps["ffn_out"].taylor for maps in self.maps]).flatten() / self.unit_cost
        step = torch.cat([heads, units])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(step)
        for module in outputs:
            module.taylor.zero_()
        decay = self.cfg.taylor_decay
        if self.taylor_average is None:
            self.taylor_average = step
        else:
            self.taylor_average.mul_(decay).add_(step, alpha=1.0 - decay)

    def importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance per parameter of each head and each unit: (layers x heads, layers x units)."""
        if self.cfg.criterion == "taylor" and self.taylor_average is not None:
            average = self.taylor_average
            layers = len(self.maps)
            return average[:layers * self.heads].reshape(layers, self.heads), \
                average[layers * self.heads:].reshape(layers, self.units)
        return self.magnitude_importance()

    def magnitude_importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean |W| over each head's and each unit's weights: (layers x heads, layers x units)."""
        heads, units = [], []
        for maps in self.maps:
            device = maps["ffn_out"].group_mask.device
            head = torch.zeros(self.heads, device=device)
            unit = torch.zeros(self.units, device=device)
            for kind, module in maps.items():
                with gathered([module.weight]):
                    magnitude = module.weight.detach().float().abs().sum(1 if module.rows else 0)
                if kind in HEAD_MAPS:
                    head += magnitude.reshape(self.heads, self.head_dim).sum(1)
                else:
                    unit += magnitude
            heads.append(head)
            units.append(unit)
        hidden = self.maps[0]["query"].in_features
        return torch.stack(heads) / (4 * hidden * self.head_dim), torch.stack(units) / (2 * hidden)

    def select(self, allowance: int, head_allowance: int | None = None) -> None:
        """Keep the most important groups per parameter while their cost fits `allowance` (greedy, in order); with
        `head_allowance`, heads are chosen first within it and units fill what is left of `allowance`."""
        heads, units = self.importance()
        if head_allowance is None:
            keep = greedy_fill(torch.cat([heads.flatten(), units.flatten()]), heads.numel(), self.head_cost,
                               self.unit_cost, allowance)
            self.kept_heads = keep[:heads.numel()].reshape(heads.shape)
            self.kept_units = keep[heads.numel():].reshape(units.shape)
        else:
            kept_heads = greedy_fill(heads.flatten(), heads.numel(), self.head_cost, self.head_cost, head_allowance)
            left = allowance - kept_heads.sum() * self.head_cost  # on the device: no value is read back
            kept_units = greedy_fill(units.flatten(), 0, self.unit_cost, self.unit_cost, left)
            self.kept_heads, self.kept_units = kept_heads.reshape(heads.shape), kept_units.reshape(units.shape)
        self._write_masks()

    def _write_masks(self) -> None:
        for maps, heads, units in zip(self.maps, self.kept_heads, self.kept_units, strict=True):
            head_mask = heads.repeat_interleave(self.head_dim)
            for kind in HEAD_MAPS:
                maps[kind].group_mask.copy_(head_mask)
            for kind in UNIT_MAPS:
                maps[kind].group_mask.copy_(units)

    # ------------------------------------------------------------ the schedule
    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.step = step
        if self.fixed:
            return
        self._step_taylor()
        if self.in_fixed_phase(step):
            self.enter_fixed_phase()
            return
        target = int(self.schedule(step, float(self.removable), float(self.allowance)))
        if target < self.removable:
            head_target = None if self.head_allowance is None else \
                int(self.schedule(step, float(self.all_heads_cost), float(self.head_allowance)))
            self.select(target, head_target)

    def enter_fixed_phase(self) -> None:
        """The final groups, kept from here on (the fixed-mask phase)."""
        self.final_masks()
        self.fixed = True

    def final_masks(self) -> None:
        """The groups of the budget, and no more Taylor accumulation (what the fixed-mask phase trains with)."""
        self.select_budget()
        self._probe(False)

    def select_budget(self) -> None:
        """The groups that fill B (and the heads' share of it, when set)."""
        self.select(self.allowance, self.head_allowance)

    def final_report(self, model: nn.Module) -> dict[str, Any]:
        if not self.fixed:
            self.select_budget()
        heads = self.kept_heads.sum(1).tolist()
        units = self.kept_units.sum(1).tolist()
        return {**self.kept_report(model), "kept_heads_per_layer": heads, "kept_units_per_layer": units,
                "blocks_without_attention": [i for i, h in enumerate(heads) if h == 0],
                "blocks_without_ffn": [i for i, u in enumerate(units) if u == 0],
                "fixed_groups_from_step": self.schedule_end + 1 if self.fixed else None}

    def kept_report(self, model: nn.Module) -> dict[str, Any]:
        """Kept parameters as the budget counts them: the kept groups' weights and biases, and the fixed part."""
        report = super().kept_report(model)
        groups = int(self.kept_heads.sum()) * self.head_cost + int(self.kept_units.sum()) * self.unit_cost
        kept = self.fixed_part + groups
        assert self.budget is not None
        return {**report, "kept_blocks": kept, "kept_fraction": kept / self.budget.dense_blocks,
                "within_budget": kept <= self.budget.target}

    def kept_in(self, module: nn.Module) -> int:
        """Kept weight entries of one map (its kept rows or columns times the other side)."""
        out, inp = full_shape(module.weight)
        kept = int(module.group_mask.count_nonzero())
        return kept * (inp if module.rows else out)

    def metrics(self) -> dict[str, float]:
        return {**self.kept_metrics(), "pruning/kept_heads": float(self.kept_heads.sum()),
                "pruning/kept_units": float(self.kept_units.sum())}

    def state_dict(self) -> dict[str, Any]:
        average = None if self.taylor_average is None else self.taylor_average.cpu().tolist()
        return {**super().state_dict(), "kept_heads": self.kept_heads.tolist(), "kept_units": self.kept_units.tolist(),
                "taylor_average": average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "kept_heads" in state:  # the masks themselves come back with the checkpoint's buffers
            device = self.kept_heads.device
            self.kept_heads = torch.tensor(state["kept_heads"], dtype=torch.bool, device=device)
            self.kept_units = torch.tensor(state["kept_units"], dtype=torch.bool, device=device)
        if state.get("taylor_average") is not None:
            device = self.maps[0]["ffn_out"].group_mask.device
            self.taylor_average = torch.tensor(state["taylor_average"], dtype=torch.float32, device=device)
        if self.fixed:
            self._probe(False)


def greedy_fill(importance: torch.Tensor, heads: int, head_cost: int, unit_cost: int,
                allowance: int | torch.Tensor) -> torch.Tensor:
    """Which groups to keep (the first `heads` entries are heads): most important first while each fits what is
    left of `allowance`, skipping those that do not. The loop over groups, vectorised on the groups' device (no
    value is read back): the groups before the first that does not fit are kept; after it only groups of the
    smaller cost can fit, and the next ones of that cost are taken while the room left holds them."""
    costs = torch.full((importance.numel(),), unit_cost, dtype=torch.int64, device=importance.device)
    costs[:heads] = head_cost
    order = torch.argsort(importance, descending=True, stable=True)
    ordered = costs[order]
    spent = torch.cumsum(ordered, 0)
    prefix = torch.cumprod((spent <= allowance).to(torch.int64), 0).bool()
    room = allowance - (spent * prefix).max()  # what the kept prefix leaves
    small = min(head_cost, unit_cost)
    candidates = ~prefix & (ordered == small)
    taken = candidates & (torch.cumsum(candidates.to(torch.int64), 0) <= torch.div(room, small, rounding_mode="floor"))
    return torch.zeros_like(prefix).scatter(0, order, prefix | taken)

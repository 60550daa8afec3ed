"""Element-wise pruning: the masked layer (its dense fold and bit-mask compact form beside it) and the hook that
magnitude, movement and soft movement share: the top-k of a criterion along the cubic schedule, per matrix or over
all matrices, and the one place that reads criteria under ZeRO-3. Each method's module owns its settings and its
rule: what ranks the entries (`criterion`), where the top-k is taken (`scope`), how masks move (`move_masks`)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtp.model import encoder_layers
from mtp.pruning.base import (
    PrunableLayer,
    PruningHook,
    PruningSettings,
    host_reads_are_free,
    prunable_modules,
    replace_prunable,
)
from mtp.pruning.topk import TopK, allocate, select_rows_on_device
from mtp.zero3 import gathered, is_partitioned

Scope = Literal["per_matrix", "global"]


class ScopeSetting(PruningSettings):
    """The key of methods whose top-k scope is the user's choice (magnitude, movement)."""

    scope: Scope = "per_matrix"
    """Element-wise top-k per matrix or over all prunable matrices at once."""


class _StraightThroughMask(torch.autograd.Function):
    """W * M in the forward pass; dL/dW = g * M and dL/dS = dL/dM = g * W in the backward pass (fused)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        weight, mask = ctx.saved_tensors
        return grad * mask, grad * weight, None


class MaskedLinear(PrunableLayer):
    """y = (W * M) x + b; with scores bound (`bind_scores`), M's gradient flows straight through to S.

    The mask is a 0/1 buffer in the weight's dtype (no conversion in the forward pass), a bool under ZeRO-3 (it is
    not partitioned: a quarter of the memory); count kept entries with `count_nonzero`, never by summing it. The
    scores S are one piece of a parameter the layer does not own (one per encoder block: `BlockScores`), so that
    DeepSpeed handles one score tensor per block, not one per matrix; saved files keep them as `PATH.scores`.
    """

    compact_format = "bitmask"
    state_suffixes = ("mask", "scores")

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        if hasattr(linear.weight, "ds_id"):  # a ZeRO-3 partition: the mask is whole on every rank, so it is a bool
            shape = tuple(linear.weight.ds_shape)
            self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=linear.weight.device))
        else:
            self.register_buffer("mask", torch.ones_like(linear.weight))
        # (the block's scores, this matrix's piece of them): a tuple, so that the module registers nothing of it
        self.score_source: tuple[BlockScores, int] | None = None

    def bind_scores(self, block: BlockScores, index: int) -> None:
        """Learn S as piece `index` of `block`'s scores."""
        self.score_source = (block, index)

    @property
    def score_param(self) -> nn.Parameter | None:
        """The parameter that holds S (with the other matrices' of the block)."""
        return None if self.score_source is None else self.score_source[0].param

    @property
    def scores(self) -> torch.Tensor | None:
        """S, a view of the block's score parameter (under ZeRO-3: read it only while that parameter is gathered)."""
        if self.score_source is None:
            return None
        block, index = self.score_source
        return block.piece(block.param, index)

    @property
    def score_grad(self) -> torch.Tensor | None:
        """dL/dS, a view of the block's score gradient (None while it has none)."""
        if self.score_source is None or self.score_source[0].param.grad is None:
            return None
        block, index = self.score_source
        return block.piece(block.param.grad, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.score_source is not None and self.training and self.score_source[0].param.requires_grad:
            block, index = self.score_source
            scores = block.forward_piece(index)
            weight = _StraightThroughMask.apply(self.weight, scores, self.mask.to(self.weight.dtype))
        else:
            weight = self.weight * self.mask.to(self.weight.dtype)
        return F.linear(x, weight, self.bias)

    @classmethod
    def fold(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> torch.Tensor:
        """Zeros where masked."""
        return state[f"{path}.weight"] * state[f"{path}.mask"].to(state[f"{path}.weight"].dtype)

    @classmethod
    def compact(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> dict[str, torch.Tensor]:
        """A packed bit mask, the kept values in row-major order, and the shape."""
        mask = state[f"{path}.mask"].bool()
        return {f"{path}.bitmask": torch.from_numpy(np.packbits(mask.numpy().reshape(-1))),
                f"{path}.values": state[f"{path}.weight"][mask].contiguous(),
                f"{path}.shape": torch.tensor(list(mask.shape), dtype=torch.int64)}

    @classmethod
    def from_compact(cls, tensors: dict[str, torch.Tensor], path: str, bias: torch.Tensor | None,
                     sparse_compute: bool) -> nn.Module:
        """A CSR sparse layer, or with `sparse_compute=False` a dense nn.Linear holding the zeros."""
        shape = tuple(tensors.pop(f"{path}.shape").tolist())
        bits = np.unpackbits(tensors.pop(f"{path}.bitmask").numpy(), count=int(np.prod(shape)))
        mask = torch.from_numpy(bits.astype(bool)).reshape(shape)
        values = tensors.pop(f"{path}.values")
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[mask] = values
        if sparse_compute:
            return SparseLinear(weight, bias)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        linear.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
        return linear


BLOCK_SCORES = "mtp_scores"
"""The name of an encoder block's score parameter."""


class BlockScores:
    """The scores S of one encoder block's masked matrices, in one parameter registered on the block (`mtp_scores`:
    under ZeRO-3 it is gathered while the block runs), each matrix's S a piece of it in row-major order.

    In the training forward pass the pieces come from one `split` per pass of the block, made when the first matrix
    asks for its piece and dropped when the block's pass begins and ends (forward hooks on the block, which fire when
    the block is called as a module, as transformers calls its layers): the backward pass then writes the block's
    score gradient in one `cat`, where a slice per matrix would build a zeroed gradient of the whole block for each.
    Saved files keep one `PATH.scores` per matrix: the block answers `saved_parts` (mtp.zero3.saved_parts). Held by
    plain references, so `copy.deepcopy` of a model copies it whole.
    """

    def __init__(self, block: nn.Module, members: list[tuple[str, MaskedLinear]], dtype: torch.dtype,
                 device: torch.device):
        self.paths = [name for name, _ in members]
        self.shapes = [tuple(m.mask.shape) for _, m in members]
        self.sizes = [m.mask.numel() for _, m in members]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.param = _ScoreParameter(sum(self.sizes), dtype, device).scores
        block.register_parameter(BLOCK_SCORES, self.param)
        block.saved_parts = self.saved_parts  # a bound method in the block's __dict__: deepcopy rebinds it
        block.register_forward_pre_hook(self._drop_pieces)
        block.register_forward_hook(self._drop_pieces)
        self._pieces: list[torch.Tensor] | None = None
        # a method's term of the block's scores, taken in its training forward pass (where ZeRO-3 has gathered them)
        self.score_term: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.aux: torch.Tensor | None = None
        for index, (_, m) in enumerate(members):
            m.bind_scores(self, index)

    def piece(self, values: torch.Tensor, index: int) -> torch.Tensor:
        """Matrix `index`'s piece of `values` (the parameter or its gradient), by a slice."""
        return values.narrow(0, self.offsets[index], self.sizes[index]).view(self.shapes[index])

    def forward_piece(self, index: int) -> torch.Tensor:
        """Matrix `index`'s piece of the parameter in this forward pass of the block (one split per pass)."""
        if self._pieces is None:
            self._pieces = [p.view(shape) for p, shape in zip(self.param.split(self.sizes), self.shapes, strict=True)]
            if self.score_term is not None:  # once per pass, over the whole block
                self.aux = self.score_term(self.param)
        return self._pieces[index]

    def _drop_pieces(self, *_: Any) -> None:
        self._pieces = None

    def saved_parts(self, name: str) -> list[tuple[str, int, tuple[int, ...]]] | None:
        """`mtp_scores` is saved as each matrix's `PATH.scores` (offsets in the parameter, shapes)."""
        if name != BLOCK_SCORES:
            return None
        return [(f"{path}.scores", offset, shape)
                for path, offset, shape in zip(self.paths, self.offsets, self.shapes, strict=True)]


def attach_block_scores(model: nn.Module, modules: list[MaskedLinear], dtype: torch.dtype,
                        device: torch.device) -> list[BlockScores]:
    """One score parameter per encoder block, S = 0, bound to the block's masked matrices (`BlockScores`). Call it
    where the layers are built (inside `deepspeed.zero.Init` under ZeRO-3: the parameter is made by a module's
    constructor, so it is partitioned)."""
    inside = {id(m) for m in modules}
    return [BlockScores(layer, [(name, m) for name, m in layer.named_modules() if id(m) in inside], dtype, device)
            for layer in encoder_layers(model)]


class _ScoreParameter(nn.Module):
    """Makes a block's score parameter in a module constructor (what `deepspeed.zero.Init` partitions)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.scores = nn.Parameter(torch.zeros(numel, dtype=dtype, device=device))


class SparseLinear(nn.Module):
    """y = x W^T + b with W held as a CSR sparse matrix (the compact form's inference layer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_csr", weight.to_sparse_csr())
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = (self.weight_csr @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class ElementwisePruning(PruningHook):
    """Masks over the entries of every prunable matrix, kept at the top-k of the method's criterion along the cubic
    schedule, per matrix or globally; a method says what the criterion is and may move masks another way."""

    with_scores: ClassVar[bool] = False
    """Whether the layers learn a score per weight (the criterion's parameter is then `scores`, else `weight`)."""

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        replace_prunable(model, lambda linear, _idx, _kind: MaskedLinear(linear))
        self.modules = [m for _, _, m in prunable_modules(model)]
        first = self.modules[0].weight
        self.blocks = attach_block_scores(model, self.modules, first.dtype, first.device) if self.with_scores else []
        self.score_params = [block.param for block in self.blocks]
        self.density = 1.0
        self.threshold: float | torch.Tensor | list[float | torch.Tensor] = 0.0
        self.topk = [TopK() for _ in self.modules]  # per-matrix selectors (their state only makes them fast)
        self.global_topk = TopK()

    # ------------------------------------------------------------ what a method defines
    @property
    def scope(self) -> Scope:
        """Where the top-k is taken: per matrix or over all matrices at once."""
        raise NotImplementedError

    def criterion(self, m: MaskedLinear) -> torch.Tensor:
        """The values whose largest entries are kept (read while the criterion's parameter is gathered)."""
        raise NotImplementedError

    # ------------------------------------------------------------ the schedule and the top-k
    def progress(self) -> float:
        """0 before pruning starts, 1 from the cool-down on."""
        return 1.0 - self.schedule(self.step, 1.0, 0.0)

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.step = step
        assert self.budget is not None
        if self.fixed:
            return
        if self.in_fixed_phase(step):
            self.enter_fixed_phase()
            return
        self.move_masks(step)

    def enter_fixed_phase(self) -> None:
        """The final masks, kept from here on (the fixed-mask phase)."""
        self.final_masks()
        self.fixed = True
        self._stop_score_learning()

    def _stop_score_learning(self) -> None:
        """At fixed masks the scores leave the step: they would change nothing, yet their gradient would be computed,
        reduced and counted in the clipping norm every step. They leave the forward pass and stop requiring a
        gradient: the ZeRO-0 optimizer skips them, DeepSpeed's ZeRO stages read a zero gradient (Adam's momentum may
        still move them; nothing reads them any more), where ZeRO-3 would otherwise apply the last gradient it
        reduced again (a parameter's gradient partition is only overwritten when a new one arrives)."""
        if self.with_scores:  # (a hook not set up yet may be loaded: magnitude's has nothing to do)
            for param in self.score_params:
                param.requires_grad_(not self.fixed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._stop_score_learning()

    def move_masks(self, step: int) -> None:
        """The masks of this step: the top `density` of the criterion, the density on the cubic schedule."""
        assert self.budget is not None
        self.density = self.schedule(step, 1.0, self.budget.density)
        self.update_masks(self.density)

    def criterion_param(self, m: MaskedLinear) -> nn.Parameter:
        """The parameter the criterion reads: the weight, or the block's scores."""
        return m.weight if m.score_param is None else m.score_param

    def criteria(self, keep: bool = False) -> Iterator[tuple[MaskedLinear, torch.Tensor]]:
        """Each matrix with its criterion, one criterion parameter gathered at a time under ZeRO-3 (the one place
        that does; a block's scores serve its six matrices): with `keep`, a gathered criterion is copied so that it
        outlives its gather."""
        for _, group in itertools.groupby(self.modules, key=lambda m: id(self.criterion_param(m))):
            members = list(group)
            param = self.criterion_param(members[0])
            with gathered([param]):
                for m in members:
                    crit = self.criterion(m)
                    yield m, crit.clone() if keep and is_partitioned(param) else crit

    def update_masks(self, density: float) -> None:
        """Keep the top `density` of the prunable entries, per matrix or over all matrices at once (`scope`)."""
        sizes = [m.mask.numel() for m in self.modules]
        kept_total = int(math.floor(density * sum(sizes))) if density < 1.0 else sum(sizes)
        if density < 1.0 and self.scope == "global":
            criteria = [crit for _, crit in self.criteria(keep=True)]
            self.threshold = self.global_topk.select(criteria, kept_total, [m.mask for m in self.modules])
            return
        counts = allocate(kept_total, sizes, density)
        if self._batched_on_device():
            self._record_threshold(self._select_by_size(counts))
            return
        self._record_threshold([topk.select([crit], k, [m.mask]) for (m, crit), k, topk
                                in zip(self.criteria(), counts, self.topk, strict=True)])

    def _batched_on_device(self) -> bool:
        """On an accelerator, with whole (not ZeRO-3 partitioned) criteria: one batched top-k per matrix size."""
        source = self.criterion_param(self.modules[0])
        return not host_reads_are_free(source) and not any(is_partitioned(self.criterion_param(m))
                                                            for m in self.modules)

    def _select_by_size(self, counts: list[int]) -> list[torch.Tensor]:
        """Per-matrix top-k of every matrix, the matrices of one size in one batch (select_rows_on_device)."""
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(self.modules):
            by_size.setdefault(m.mask.numel(), []).append(i)
        criteria = [crit for _, crit in self.criteria()]
        thresholds: list[torch.Tensor] = []
        for members in by_size.values():
            thresholds += select_rows_on_device([criteria[i] for i in members], [counts[i] for i in members],
                                                [self.modules[i].mask for i in members])
        return thresholds

    def _record_threshold(self, thresholds: list[float | torch.Tensor]) -> None:
        """Per matrix, the reported threshold is the median of the matrices' (0 while nothing is pruned); device
        thresholds are kept as they are and read only when reported."""
        self.threshold = thresholds

    def reported_threshold(self) -> float:
        """The threshold for the logs: the global one, or the median over the matrices (0 while nothing is pruned)."""
        values = self.threshold if isinstance(self.threshold, list) else [self.threshold]
        finite = [t for t in map(float, values) if math.isfinite(t)]
        return statistics.median(finite) if finite else 0.0

    def final_masks(self) -> None:
        """The masks at the budget: the final top-k."""
        assert self.budget is not None
        self.density = self.budget.density
        self.update_masks(self.density)

    def final_report(self, model: nn.Module) -> dict[str, Any]:
        return {**self.kept_report(model), "fixed_masks_from_step": self.schedule_end + 1 if self.fixed else None}

    def kept_in(self, module: nn.Module) -> int:
        return int(module.mask.count_nonzero())

    def metrics(self) -> dict[str, float]:
        assert self.budget is not None
        return {**self.kept_metrics(), "pruning/target_density": self.density,
                "pruning/threshold": self.reported_threshold()}


class ScopedElementwisePruning(ElementwisePruning):
    """Element-wise pruning whose top-k scope is `pruning.scope` (ScopeSetting)."""

    cfg: ScopeSetting

    @property
    def scope(self) -> Scope:
        return self.cfg.scope

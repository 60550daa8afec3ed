"""Rank pruning (FLOP, Wang et al. 2020): W = P diag(g) Q from the SVD of W, hard-concrete gates g, and an augmented
Lagrangian that holds the expected size on the cubic schedule; projected to the budget (ranks by log alpha) at the end.
The factorised layer carries its merge (P diag(g) Q) and its compact form (the open ranks) beside it."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mtp.pruning.base import (
    PrunableLayer,
    PruningHook,
    PruningSettings,
    host_reads_are_free,
    prunable_modules,
    replace_prunable,
)
from mtp.zero3 import full_numel, full_shape, gathered, is_partitioned


class RankSettings(PruningSettings):
    method: Literal["rank"] = "rank"
    gate_lr: float = Field(5e-2, gt=0.0)
    """Learning rate of the gates' log alpha, constant (it follows neither warmup nor decay)."""
    lagrangian_lr: float = Field(0.1, gt=0.0)
    """Step size of the gradient ascent on lambda1 and lambda2."""
    lambda2_init: float = Field(100.0, ge=0.0)
    """Initial lambda2, the weight of the quadratic penalty (s - t)^2 that keeps the expected size on the target
    (with 0, lambda1 alone lags, winds up and overshoots; docs/pruning.md)."""
    log_alpha_init: float = 2.5
    """Initial log alpha; 2.5 makes every deterministic gate 1 (the pretrained map). Gates are not sampled before
    the pruning warmup ends (a sampled gate falls below 1 on 29% of the ranks at 2.5)."""
    size_control: Literal["lagrangian", "shift"] = "lagrangian"
    """How the expected size follows the schedule on the ramp: "lagrangian" (FLOP's augmented Lagrangian, the
    multipliers by gradient ascent), or "shift": after every optimizer step all log alpha move by one common amount,
    found by bisection on the device, that puts the expected size on the target exactly (the gradients then rank the
    ranks; no penalty in the loss)."""
    lag_limit: float | None = Field(1.05, ge=1.0)
    """With "lagrangian": the most the expected size may stay above the target along the ramp, as a factor (1.05:
    5% over); what a size over it does is `lag_response`. Bounds the lag of the gates behind the budget at small
    sizes, so that the final projection cuts at most that much. None: the Lagrangian alone (and the cut at the fix,
    which removed most of a small model at once: docs/results/size_control/)."""
    lag_response: Literal["shift", "close"] = "close"
    """What `lag_limit` does to a size over its limit: "close" closes the kept ranks with the smallest log alpha,
    over all matrices, until the expected size is at the limit, and leaves the others as they are (a closed rank
    stays closed, and the final projection keeps only ranks still open); "shift" moves every log alpha down by one
    common amount (found by bisection, as in size_control "shift"; the gates left open become partial)."""
    close_order: Literal["log_alpha", "energy"] = "log_alpha"
    """Which kept ranks `lag_response: close` closes first: the smallest log alpha over all matrices, or the smallest
    share of their matrix's energy (|P_r|^2 |Q_r|^2 g_r^2 over the matrix's sum, g the deterministic gate: the
    singular-value order at the start, a truncated SVD as it goes)."""
    close_from: float | None = Field(0.5, ge=0.0, lt=1.0)
    """Where on the ramp `lag_response: close` starts, as a fraction of it (0.5: half-way); before it the Lagrangian
    runs alone. From there the most the expected size may be falls on a straight line from the size it has at that
    step to `lag_limit` times the final target at the ramp's end (never under `lag_limit` times the schedule's
    target), so the ranks the Lagrangian left open close over the rest of the ramp instead of at the cut. None: the
    limit holds along the whole ramp."""
    gate_beta: float = Field(2.0 / 3.0, gt=0.0)
    gate_low: float = Field(-0.1, lt=0.0)
    gate_high: float = Field(1.1, gt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _limits_follow_what_is_set(cls, data: Any) -> Any:
        """The size limit's defaults apply only where they mean something: not under size_control "shift" (which
        holds the size itself), not lag_response "close" without a limit, not close_from without closing."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("size_control", "lagrangian") != "lagrangian":
            data.setdefault("lag_limit", None)
        if data.get("lag_limit", 1.05) is None:
            data.setdefault("lag_response", "shift")
        if data.get("lag_response", "close") != "close":
            data.setdefault("close_from", None)
        return data

    @model_validator(mode="after")
    def _lag_limit_needs_the_lagrangian(self) -> RankSettings:
        if self.lag_limit is not None and self.size_control != "lagrangian":
            raise ValueError("pruning.lag_limit: bounds the Lagrangian's lag; size_control 'shift' holds the size "
                             "itself (leave lag_limit unset)")
        if self.lag_response != "shift" and self.lag_limit is None:
            raise ValueError("pruning.lag_response: says what lag_limit does; set lag_limit (e.g. 1.1) with it")
        if self.close_from is not None and self.lag_response != "close":
            raise ValueError("pruning.close_from: says where lag_response 'close' starts; set lag_response: close "
                             "(and lag_limit) with it")
        if self.close_order != "log_alpha" and self.lag_response != "close":
            raise ValueError("pruning.close_order: orders the closing of lag_response 'close'; set lag_response: close "
                             "(and lag_limit) with it")
        return self


_CONSTANTS: dict[tuple[torch.device, float], torch.Tensor] = {}


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a float32 0-dim tensor on `like`'s device, made once per device and value. Arithmetic on float32
    gates with it gives the same bits as with the Python number, without the cast of the number to a tensor that
    every such operator (and its backward) records: on an accelerator each is host work in the step."""
    key = (like.device, value)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        with torch.inference_mode(False):  # made under inference mode it could not be saved for a later backward
            tensor = _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=like.device)
    return tensor


def deterministic_gates(log_alpha: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Hard-concrete gates without noise (evaluation, export): clamp(sigmoid(log alpha) (high - low) + low, 0, 1)."""
    if log_alpha.dtype != torch.float32:  # the constants are float32: other precisions take the Python numbers
        return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0.0, 1.0)
    stretched = torch.sigmoid(log_alpha) * constant(high - low, log_alpha) + constant(low, log_alpha)
    return stretched.clamp(constant(0.0, log_alpha), constant(1.0, log_alpha))


def sampled_gates(log_alpha: torch.Tensor, beta: float, low: float, high: float) -> torch.Tensor:
    """Hard-concrete samples for float32 log alpha: clamp(sigmoid((logit(u) + log alpha) / beta) (high - low) + low,
    0, 1) with u uniform."""
    u = torch.rand_like(log_alpha).clamp(constant(1e-6, log_alpha), constant(1 - 1e-6, log_alpha))
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / constant(beta, log_alpha))
    stretched = s * constant(high - low, log_alpha) + constant(low, log_alpha)
    return stretched.clamp(constant(0.0, log_alpha), constant(1.0, log_alpha))


def expected_open_each(log_alpha: torch.Tensor, beta: float, low: float, high: float) -> torch.Tensor:
    """P(gate > 0) of each rank: sigmoid(log alpha - beta log(-low / high))."""
    return torch.sigmoid(log_alpha - constant(beta * math.log(-low / high), log_alpha))


def factor_views(factors: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P (d_out x r) and Q (r x d_in), views of the one parameter that holds both (P's rows, then Q's values)."""
    return factors[:out_features], factors[out_features:].view(-1, in_features)


class _LowRankProduct(torch.autograd.Function):
    """y = P (g * (Q x)) + b over the ranks in `index` (all of them when None), with P and Q read from their one
    parameter: the products F.linear(F.linear(x, Q) * g, P, b) runs under autograd (the same matrix products, so the
    same values bit for bit), with one gradient for both factors, written into one tensor: one tensor per matrix for
    the optimizer and ZeRO to handle, not two, and fewer operators than autograd's two linears. Under ZeRO-3 it keeps
    the parameter itself for the backward pass, not views of it, so that ZeRO-3 may release it in between."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factors: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor | None, out_features: int, in_features: int) -> torch.Tensor:
        p, q = factor_views(factors, out_features, in_features)
        if index is not None:
            p, q = p.index_select(1, index), q.index_select(0, index)
        x_2d = x.reshape(-1, in_features)
        # under torch.autocast the products run in its dtype, as autocast runs F.linear's; the backward pass (which
        # autocast does not reach) then computes in that dtype too and returns each gradient in its input's dtype
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if cast is not None:  # (the multiply by the gates promotes, as outside the function)
            x_2d, p, q = x_2d.to(cast), p.to(cast), q.to(cast)
            bias = bias.to(cast) if bias is not None else None
        hidden = torch.mm(x_2d, q.t())  # F.linear(x, q) is this product (its batch dimensions folded)
        scaled = hidden * gates
        if cast is not None:
            scaled = scaled.to(cast)
        y = torch.mm(scaled, p.t()) if bias is None else torch.addmm(bias, scaled, p.t())  # as F.linear(., p, b)
        ctx.shapes = (x.shape, out_features, in_features)
        ctx.has_bias = bias is not None
        ctx.cast = cast is not None
        # the factors' views are kept where the parameter stays whole; a ZeRO-3 partition is read again
        factors_kept = (p, q) if index is not None or cast is not None or not is_partitioned(factors) else ()
        ctx.save_for_backward(x_2d, factors, gates, hidden, scaled, index, *factors_kept)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_2d, factors, gates, hidden, scaled, index, *factors_kept = ctx.saved_tensors
        x_shape, out_features, in_features = ctx.shapes
        p, q = factors_kept if factors_kept else factor_views(factors, out_features, in_features)
        grad_2d = grad.reshape(-1, out_features)
        grad_scaled = grad_2d.mm(p)
        if ctx.cast:  # the gates' multiply ran promoted (to the gates' dtype): its backward does too
            grad_scaled = grad_scaled.to(gates.dtype)
        grad_hidden = grad_scaled * gates
        if ctx.cast:
            grad_hidden = grad_hidden.to(hidden.dtype)
        grad_x = grad_gates = grad_factors = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_hidden.mm(q).view(x_shape)
        if ctx.needs_input_grad[1]:
            # as autograd's mm backward takes a weight's gradient (grad^T input; the weight enters transposed)
            if index is None and not ctx.cast:  # written in place into the one gradient of both factors
                grad_factors = torch.empty_like(factors)
                whole_p, whole_q = factor_views(grad_factors, out_features, in_features)
                torch.mm(grad_2d.t(), scaled, out=whole_p)
                torch.mm(grad_hidden.t(), x_2d, out=whole_q)
            else:  # a selection of ranks leaves the others' gradient 0; a cast one is copied in whole
                grad_factors = torch.zeros_like(factors) if index is not None else torch.empty_like(factors)
                whole_p, whole_q = factor_views(grad_factors, out_features, in_features)
                grad_p, grad_q = grad_2d.t().mm(scaled), grad_hidden.t().mm(x_2d)
                if ctx.cast:
                    grad_p, grad_q = grad_p.to(factors.dtype), grad_q.to(factors.dtype)
                if index is None:
                    whole_p.copy_(grad_p)
                    whole_q.copy_(grad_q)
                else:
                    whole_p.index_add_(1, index, grad_p)
                    whole_q.index_add_(0, index, grad_q)
        if ctx.needs_input_grad[2]:
            grad_gates = (grad_scaled * hidden).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_factors, grad_gates, grad_bias, None, None, None


class FactorizedLinear(PrunableLayer):
    """y = P diag(g) Q x + b, initialised from the SVD of W (P = U sqrt(S), Q = sqrt(S) V^T), so it starts as W."""

    compact_format = "lowrank"
    state_suffixes = ("P", "Q", "log_alpha", "keep", "gate_offset")

    def __init__(self, linear: nn.Linear, beta: float, stretch: tuple[float, float], log_alpha_init: float,
                 offset: bool = False):
        super().__init__()
        with gathered([linear.weight]):  # under ZeRO-3 (inside deepspeed.zero.Init) P and Q are partitioned as made
            weight = linear.weight.detach().float().clone()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s.sqrt()
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # P = U sqrt(S) (d_out x r) and Q = sqrt(S) V^T (r x d_in) in one parameter of r columns: P's rows, then Q's
        # values (factor_views); two-dimensional, so it takes the weights' decay as P and Q each would
        rank = s.numel()
        self.factors = nn.Parameter(torch.cat([u * root, (root[:, None] * vh).reshape(-1, rank)]).to(dtype))
        self.bias = linear.bias
        self.log_alpha = nn.Parameter(torch.full((s.numel(),), float(log_alpha_init)))
        # size_control "shift": one amount added to every log alpha, moved by the hook (not by the optimizer, whose
        # master copy of log alpha would overwrite an edit of the parameter); absent otherwise (older runs' state)
        self.gate_offset: torch.Tensor | None
        if offset:
            self.register_buffer("gate_offset", torch.zeros(()))
        else:
            self.gate_offset = None
        self.register_buffer("keep", torch.ones(s.numel(), dtype=torch.bool))
        self.beta, (self.low, self.high) = beta, stretch
        self.sample = True  # the hook turns sampling off outside the pruning ramp (deterministic gates)
        self.aux: torch.Tensor | None = None
        # the gates of this layer's kept ranks for its next forward pass, in the weights' dtype, when the hook has
        # computed every layer's at once (RankPruning.gates_for_all_layers); used once
        self.given_gates: torch.Tensor | None = None
        self._kept_index: tuple[tuple[int, int], torch.Tensor | None] | None = None

    @property
    def rank_cost(self) -> int:
        return self.in_features + self.out_features

    @property
    def P(self) -> torch.Tensor:  # noqa: N802 (the factorisation's own name)
        """P (d_out x r), a view of `factors`."""
        return factor_views(self.factors, self.out_features, self.in_features)[0]

    @property
    def Q(self) -> torch.Tensor:  # noqa: N802
        """Q (r x d_in), a view of `factors`."""
        return factor_views(self.factors, self.out_features, self.in_features)[1]

    def saved_parts(self, name: str) -> list[tuple[str, int, tuple[int, int]]] | None:
        """`factors` is saved as P and Q (mtp.zero3.saved_parts): the files keep the factorisation's own layout."""
        if name != "factors":
            return None
        rank = full_shape(self.factors)[1]
        return [("P", 0, (self.out_features, rank)), ("Q", self.out_features * rank, (rank, self.in_features))]

    def _product(self, x: torch.Tensor, gates: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """P (g * (Q x)) + b over the ranks in `index` (all when None); `gates` are those ranks' gates."""
        return _LowRankProduct.apply(x, self.factors, gates, self.bias, index, self.out_features, self.in_features)

    def alphas(self) -> torch.Tensor:
        """log alpha in float32, with the hook's common offset where it keeps one."""
        log_alpha = self.log_alpha.float()
        return log_alpha if self.gate_offset is None else log_alpha + self.gate_offset.float()

    def gates(self, log_alpha: torch.Tensor | None = None, all_kept: bool | None = None) -> torch.Tensor:
        """Hard-concrete samples while training with `sample`, else deterministic gates; dropped ranks are 0."""
        log_alpha = self.alphas() if log_alpha is None else log_alpha
        if not (self.training and self.sample):
            return self._dropped_to_zero(self.deterministic_gates(log_alpha), all_kept)
        return self._dropped_to_zero(sampled_gates(log_alpha, self.beta, self.low, self.high), all_kept)

    def _dropped_to_zero(self, values: torch.Tensor, all_kept: bool | None = None) -> torch.Tensor:
        """`values` times the keep mask; while every rank is kept (before the projection) the product is `values`
        itself, so it is skipped (a multiply and its backward per matrix and forward)."""
        all_kept = self.kept_index() is None if all_kept is None else all_kept
        return values if all_kept else values * self.keep

    def deterministic_gates(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The evaluation gates for these log alpha, before the keep mask."""
        return deterministic_gates(log_alpha, self.low, self.high)

    def expected_open(self, log_alpha: torch.Tensor | None = None, all_kept: bool | None = None) -> torch.Tensor:
        """E[number of non-zero gates] = sum sigmoid(log alpha - beta log(-l/r)) over kept ranks."""
        log_alpha = self.alphas() if log_alpha is None else log_alpha
        return self._dropped_to_zero(expected_open_each(log_alpha, self.beta, self.low, self.high), all_kept).sum()

    def kept_index(self) -> torch.Tensor | None:
        """The ranks the keep mask holds (None: all of them), read once each time the mask changes (the projection,
        a checkpoint load), not per forward: the accelerator path's one read of the mask."""
        version = (self.keep.data_ptr(), self.keep._version)
        if self._kept_index is None or self._kept_index[0] != version:
            index = torch.nonzero(self.keep).squeeze(1)
            self._kept_index = (version, None if index.numel() == self.keep.numel() else index)
        return self._kept_index[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = self.given_gates  # set or cleared by the hook before every forward pass of the model (not used up
        if given is not None:      # here, so that a recomputation of this forward takes the same gates)
            return self._forward_with(x, given.to(x.dtype) if given.dtype != x.dtype else given)
        # once per forward for both the gates and the expected size (in bf16 the two gradients of log alpha are then
        # summed in float32 and rounded once, where they were rounded apart before)
        log_alpha = self.alphas()
        kept = self.kept_index()
        sampled = self.training and self.sample
        if kept is not None and kept.numel() > 0 and not sampled and not host_reads_are_free(log_alpha):
            # on an accelerator, after the projection: the kept ranks' gates, without multiplying in the keep mask
            # (1 on all of them): the same values and gradients in fewer operators. The gates are computed on the
            # whole vector and then selected, as before (a CPU's vectorised sigmoid rounds a shorter vector's tail
            # differently in the last bit)
            g = self.gates(log_alpha, all_kept=True).index_select(0, kept)
            return self._product(x, g.to(x.dtype), kept)
        g = self.gates(log_alpha, kept is None)
        if sampled:
            self.aux = self.expected_open(log_alpha, kept is None)
        if not host_reads_are_free(g):
            # on an accelerator the open gates are not read back per forward: a closed gate is exactly 0 and
            # passes no gradient, so multiplying its rank by it gives the same output and gradients as leaving
            # it out; only ranks dropped by the projection (a mask fixed for the rest of the run) are left out
            if kept is None:
                return self._product(x, g.to(x.dtype), None)
            open_ranks = kept
        else:
            open_ranks = torch.nonzero(g > 0).squeeze(1)
        if open_ranks.numel() == 0:
            return self._bias_only(x)
        if open_ranks.numel() < g.numel():
            # closed gates are exactly 0 (and pass no gradient through the clamp): leave their ranks out
            return self._product(x, g.index_select(0, open_ranks).to(x.dtype), open_ranks)
        return self._product(x, g.to(x.dtype), None)

    def _forward_with(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The map with the hook's gates of the kept ranks (all ranks before the projection)."""
        self.aux = None  # the hook has the expected size of every layer
        kept = self.kept_index()
        if kept is not None and kept.numel() == 0:
            return self._bias_only(x)
        return self._product(x, gates, kept)

    def _bias_only(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank closed: the map is its bias. A zero-width product would break ZeRO-3's linear in the backward
        pass; the zero term keeps the factors in the graph, so every data-parallel rank reduces the same gradients
        whichever gates it sampled."""
        out = x.new_zeros(*x.shape[:-1], self.out_features) + 0 * self.factors.sum().to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    @staticmethod
    def saved_gates(state: dict[str, torch.Tensor], path: str, settings: RankSettings) -> torch.Tensor:
        """The deterministic gates (as in evaluation) of a saved layer, times its final keep mask."""
        log_alpha = state[f"{path}.log_alpha"].float()
        if f"{path}.gate_offset" in state:
            log_alpha = log_alpha + state[f"{path}.gate_offset"].float()
        gates = deterministic_gates(log_alpha, settings.gate_low, settings.gate_high)
        return gates * state[f"{path}.keep"].float()

    @classmethod
    def fold(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> torch.Tensor:
        """P diag(g) Q, in float32, from the P diag(g) that `compact` stores (rounded to the saved precision), so that
        the dense fold and the compact form compute the same map also for a run saved in bf16 or fp16."""
        g = cls.saved_gates(state, path, settings)
        scaled = (state[f"{path}.P"].float() * g).to(state[f"{path}.P"].dtype)
        return scaled.float() @ state[f"{path}.Q"].float()

    @classmethod
    def compact(cls, state: dict[str, torch.Tensor], path: str, settings: PruningSettings) -> dict[str, torch.Tensor]:
        """The open ranks only: P (d_out x r) with the gates folded in, Q (r x d_in)."""
        g = cls.saved_gates(state, path, settings)
        kept = g > 0
        return {f"{path}.P": (state[f"{path}.P"].float()[:, kept] * g[kept]).to(state[f"{path}.P"].dtype),
                f"{path}.Q": state[f"{path}.Q"][kept].contiguous()}

    @classmethod
    def from_compact(cls, tensors: dict[str, torch.Tensor], path: str, bias: torch.Tensor | None,
                     sparse_compute: bool) -> nn.Module:
        return LowRankLinear(tensors.pop(f"{path}.P"), tensors.pop(f"{path}.Q"), bias)


class LowRankLinear(nn.Module):
    """y = P (Q x) + b with P (d_out x r), Q (r x d_in): the compact form's inference layer."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.P, self.Q = nn.Parameter(p), nn.Parameter(q)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Q), self.P, self.bias)


class RankPruning(PruningHook):
    """FLOP-style rank pruning with hard-concrete gates and an augmented Lagrangian on the expected size."""

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        c = self.cfg

        def factorised(linear: nn.Linear, _idx: int, _kind: str) -> FactorizedLinear:
            return FactorizedLinear(linear, c.gate_beta, (c.gate_low, c.gate_high), c.log_alpha_init,
                                    offset=c.size_control == "shift" or (c.lag_limit is not None
                                                                         and c.lag_response == "shift"))

        replace_prunable(model, factorised)
        self.modules = [m for _, _, m in prunable_modules(model)]
        self.lambda1 = 0.0
        # lambda2 starts as a real quadratic penalty (method of multipliers): its pull 2 lambda2 (s - t) follows the
        # gap at once, where lambda1 only integrates it; from 0, lambda1 alone wound up while the saturated gates
        # lagged and then overshot (a 1,000-step MiniLM run ended at 0.40 of the blocks for B = 0.5)
        self.lambda2 = c.lambda2_init
        self.close_start: tuple[int, float] | None = None  # (step, expected size) where `close_from` began closing
        self.projected = False
        with gathered([m.log_alpha for m in self.modules]):  # made partitioned under ZeRO-3
            self.start_density = self.expected_density().item()
        self.last_density = self.start_density
        self._set_sampling()
        # on an accelerator every layer's gates come from one set of operators per forward pass (not per matrix)
        self.batched_density: torch.Tensor | None = None
        self._batched_index: tuple[tuple[Any, ...], list[int], torch.Tensor | None] | None = None
        self._rank_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        model.register_forward_pre_hook(self.gates_for_all_layers)

    def gates_for_all_layers(self, model: nn.Module, _args: Any) -> None:
        """Before a training forward pass on an accelerator: the gates of every layer at once (one noise draw, one
        chain of operators, where the layers would each run their own), handed to the layers, and the expected size
        for the Lagrangian. Each gate is the same function of its log alpha and noise as in the layer; the noise is
        drawn for all layers before the pass rather than layer by layer between the dropout draws. A CPU, ZeRO-3
        partitions and evaluation keep the per-layer gates."""
        first = self.modules[0]
        self.batched_density = None
        if not model.training or host_reads_are_free(first.log_alpha) or is_partitioned(first.log_alpha):
            for m in self.modules:
                m.given_gates = None
            return
        if first.gate_offset is None:
            log_alpha = torch.cat([m.log_alpha for m in self.modules]).float()
        else:
            log_alpha = torch.cat([m.alphas() for m in self.modules])
        sampled = first.sample
        if sampled:
            gates = sampled_gates(log_alpha, first.beta, first.low, first.high)
            open_each = expected_open_each(log_alpha, first.beta, first.low, first.high)
            keep = None if all(m.kept_index() is None for m in self.modules) else torch.cat([m.keep for m in
                                                                                           self.modules])
            if keep is not None:
                open_each = open_each * keep
            assert self.budget is not None
            size = (open_each * self.rank_costs(log_alpha.device)).sum()
            self.batched_density = (size + constant(float(self.budget.non_prunable), size)) / constant(
                float(self.budget.dense_blocks), size)
        else:
            gates = deterministic_gates(log_alpha, first.low, first.high)
        counts, index = self._kept_positions()
        if index is not None:
            gates = gates.index_select(0, index)
        gates = gates.to(first.factors.dtype)
        for m, g in zip(self.modules, torch.split(gates, counts), strict=True):
            m.given_gates = g

    def _kept_positions(self) -> tuple[list[int], torch.Tensor | None]:
        """The kept ranks of every layer, counted per layer, and their positions in the layers' concatenated gates
        (None while every rank is kept); remade only when a keep mask changes (the projection, a checkpoint load)."""
        indices = [m.kept_index() for m in self.modules]
        version = tuple((m.keep.data_ptr(), m.keep._version) for m in self.modules)
        if self._batched_index is None or self._batched_index[0] != version:
            counts = [m.log_alpha.numel() if i is None else i.numel() for m, i in zip(self.modules, indices,
                                                                                     strict=True)]
            index = None
            if any(i is not None for i in indices):
                starts = [0]
                for m in self.modules[:-1]:
                    starts.append(starts[-1] + m.log_alpha.numel())
                device = self.modules[0].log_alpha.device
                index = torch.cat([torch.arange(m.log_alpha.numel(), device=device) + start if i is None else i + start
                                   for m, i, start in zip(self.modules, indices, starts, strict=True)])
            self._batched_index = (version, counts, index)
        return self._batched_index[1], self._batched_index[2]

    def _set_sampling(self) -> None:
        """Gates are sampled only on the ramp: before it the model is the dense one, after it the ranks are fixed."""
        sample = self.warmup < self.step + 1 and not self.fixed
        for m in self.modules:
            m.sample = sample

    def expected_density(self) -> torch.Tensor:
        """Expected encoder-block size over the dense size (differentiable in log alpha)."""
        assert self.budget is not None
        size = sum(m.rank_cost * m.expected_open() for m in self.modules)
        return (size + self.budget.non_prunable) / self.budget.dense_blocks

    def target(self, step: int) -> float:
        assert self.budget is not None
        end = self.budget.target / self.budget.dense_blocks
        return self.schedule(step, self.start_density, end)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [m.log_alpha for m in self.modules], "lr": self.cfg.gate_lr, "weight_decay": 0.0,
                 "name": "gates", "constant_lr": True}]

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        assert self.budget is not None
        if not self.modules[0].sample:  # no sampled gates: nothing to hold to the target
            return None
        if self.cfg.size_control == "shift":  # the size is held by `shift_to_target` after the step
            return None
        if self.batched_density is not None:
            density = self.batched_density
        else:  # the sum in the order it always had (from the first term, not from 0), with constants for the numbers
            terms = [m.aux * constant(float(m.rank_cost), m.aux) for m in self.modules if m.aux is not None]
            size = functools.reduce(operator.add, terms)
            density = (size + constant(float(self.budget.non_prunable), size)) / constant(
                float(self.budget.dense_blocks), size)
        gap = density - self.target(step)
        # on an accelerator the size stays a device tensor (no read per step), and with it the multipliers
        self.last_density = float(density.detach()) if host_reads_are_free(density) else density.detach()
        return self._as(self.lambda1, gap) * gap + self._as(self.lambda2, gap) * gap * gap

    @staticmethod
    def _as(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
        return value.to(like.dtype) if isinstance(value, torch.Tensor) else value

    def enter_fixed_phase(self) -> None:
        """The ranks projected to the budget and kept from here on (the fine-tuning phase), gates deterministic."""
        self.project()
        self.fixed = True
        self._set_sampling()

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Gradient ascent on the multipliers: d/d(lambda1) = gap, d/d(lambda2) = gap^2; at the end of the schedule
        the ranks are projected to the budget and fixed for the fine-tuning phase."""
        sampled = self.modules[0].sample
        self.step = step
        if not self.fixed and self.in_fixed_phase(step):
            self.enter_fixed_phase()
        elif sampled and self.cfg.size_control == "shift":
            self.shift_to_target(self.target(step))
        elif sampled:
            gap = self.last_density - self.target(step)
            if isinstance(gap, torch.Tensor):  # the multipliers in float64 on the device, as Python floats on a CPU
                gap = gap.double()
            self.lambda1 = self.lambda1 + self.cfg.lagrangian_lr * gap
            self.lambda2 = self.lambda2 + self.cfg.lagrangian_lr * gap * gap
            if self.cfg.lag_limit is not None and self.cfg.lag_response == "close":
                limit = self.closing_limit(step)
                if limit is not None:
                    self.close_to_expected(limit)
            elif self.cfg.lag_limit is not None:
                self.shift_to_target(self.target(step) * self.cfg.lag_limit, only_down=True)
        self._set_sampling()

    @torch.no_grad()
    def shift_to_target(self, target: float, iterations: int = 40, only_down: bool = False) -> None:
        """Move every log alpha by one amount c so that the expected size is `target` (a fraction of the dense
        blocks): bisection on c in [-40, 40], a fixed number of halvings on the device (no host read). With
        `only_down` (the lag limit) c is found in [-40, 0] and is exactly 0 when the size is at or under the target,
        so that such a step leaves the gates as they are."""
        assert self.budget is not None
        params = [m.log_alpha for m in self.modules]
        with gathered(params):
            shift = self.modules[0].beta * math.log(-self.modules[0].low / self.modules[0].high)
            alphas = torch.cat([m.alphas() for m in self.modules]) - shift
            costs = self.rank_costs(alphas.device) * torch.cat([m.keep for m in self.modules]).float()
            goal = target * self.budget.dense_blocks - self.budget.non_prunable
            if only_down and host_reads_are_free(alphas) and not bool((costs * torch.sigmoid(alphas)).sum() > goal):
                return  # under the limit: no shift (read for free on a CPU; the device path below gives 0 itself)
            low = torch.full((), -40.0, device=alphas.device)
            high = torch.full((), 0.0 if only_down else 40.0, device=alphas.device)
            for _ in range(iterations):
                middle = (low + high) / 2
                over = (costs * torch.sigmoid(alphas + middle)).sum() > goal
                high, low = torch.where(over, middle, high), torch.where(over, low, middle)
            amount = (low + high) / 2
            if only_down:  # exactly 0 where the size is not over the goal
                amount = torch.where((costs * torch.sigmoid(alphas)).sum() > goal, amount, torch.zeros_like(amount))
            offsets = [m.gate_offset for m in self.modules]
            torch._foreach_add_(offsets, amount.to(offsets[0].dtype))
            size = (costs * torch.sigmoid(alphas + amount)).sum() + self.budget.non_prunable
        if only_down:  # the recorded size stays the forward pass's, as without a limit
            return
        density = size / self.budget.dense_blocks
        self.last_density = float(density) if host_reads_are_free(density) else density

    def rank_costs(self, device: torch.device) -> torch.Tensor:
        """Every rank's cost (d_in + d_out of its matrix), the layers' ranks concatenated."""
        return self._tables(device)[0]

    def rank_owners(self, device: torch.device) -> torch.Tensor:
        """Every rank's matrix (its index in `self.modules`), the layers' ranks concatenated."""
        return self._tables(device)[1]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-rank cost and owner tables, made once per device (every matrix keeps its rank count)."""
        if device not in self._rank_tables:
            counts = [full_numel(m.log_alpha) for m in self.modules]
            owners = torch.repeat_interleave(torch.arange(len(self.modules), device=device),
                                             torch.tensor(counts, device=device))
            costs = torch.tensor([float(m.rank_cost) for m in self.modules], device=device)[owners]
            self._rank_tables[device] = (costs, owners)
        return self._rank_tables[device]

    def closing_limit(self, step: int) -> float | None:
        """The most the expected size may be after `step` (a fraction of the dense blocks) under `lag_response:
        close`; None before `close_from`."""
        assert self.cfg.lag_limit is not None
        limit = self.target(step) * self.cfg.lag_limit
        if self.cfg.close_from is None:
            return limit
        ramp_end = self.schedule_end - self.cooldown
        if step < self.warmup + self.cfg.close_from * (ramp_end - self.warmup):
            return None
        if self.close_start is None:  # the size the Lagrangian left, where closing starts (one host read)
            self.close_start = (step, float(self.last_density))
        start, size = self.close_start
        final = self.target(ramp_end) * self.cfg.lag_limit
        along = min(1.0, (step - start) / max(1, ramp_end - start))
        return max(limit, size + (final - size) * along)

    @torch.no_grad()
    def close_to_expected(self, target: float) -> None:
        """Close the kept ranks with the smallest log alpha (or energy share, `close_order`), over all matrices,
        until the expected size is at most `target` (a fraction of the dense blocks): the last one closed is the one
        that brings it there. The ranks left keep their gates. Reads on the host which masks change, all matrices at
        once (one sync on an accelerator, every call); the energy order first reads whether the size is over the
        target at all, and only then gathers every P and Q for the shares."""
        assert self.budget is not None
        with gathered([m.log_alpha for m in self.modules]):  # every data-parallel rank sorts the same values
            first = self.modules[0]
            alphas = torch.cat([m.alphas() for m in self.modules])
            keep = torch.cat([m.keep for m in self.modules])
            open_cost = (self.rank_costs(alphas.device) * expected_open_each(alphas, first.beta, first.low,
                                                                              first.high) * keep).double()
            excess = open_cost.sum() - (target * self.budget.dense_blocks - self.budget.non_prunable)
        if self.cfg.close_order == "energy":
            if not bool(excess > 0):
                return
            key = self.energy_shares().to(alphas.device)
        else:
            key = alphas
        order = torch.sort(key.masked_fill(~keep, -math.inf), stable=True).indices  # closed ones first
        removed_before = torch.cumsum(open_cost[order], 0) - open_cost[order]
        close = torch.zeros_like(keep)
        close[order] = removed_before < excess  # still over the target before this one closes
        owner = self.rank_owners(close.device)
        changed = torch.zeros(len(self.modules), device=close.device).index_add_(0, owner, (close & keep).float()) > 0
        for m, shut, moved in zip(self.modules, close.split([m.keep.numel() for m in self.modules]),
                                  changed.tolist(), strict=True):  # one host read for every matrix
            if moved:
                m.keep.masked_fill_(shut.to(m.keep.device), False)

    @torch.no_grad()
    def energy_shares(self) -> torch.Tensor:
        """Every rank's share of its matrix's energy, (|P_r| |Q_r| g_r)^2 over the matrix's sum (g the deterministic
        gate, 0 for a closed rank), the layers' ranks concatenated; one matrix gathered at a time under ZeRO-3."""
        shares = []
        for m in self.modules:
            with gathered([m.factors, m.log_alpha]):
                strength = m.P.detach().float().norm(dim=0) * m.Q.detach().float().norm(dim=1)
                energy = (strength * m.deterministic_gates(m.alphas().detach()) * m.keep).double() ** 2
                shares.append(energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny))
        return torch.cat(shares)

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "fixed": self.fixed, "lambda1": float(self.lambda1),
                 "lambda2": float(self.lambda2), "start_density": self.start_density,
                 "last_density": float(self.last_density)}
        if self.close_start is not None:
            state["close_start"] = list(self.close_start)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lambda1, self.lambda2 = state.get("lambda1", 0.0), state.get("lambda2", 0.0)
        self.start_density = state.get("start_density", self.start_density)
        self.last_density = state.get("last_density", self.last_density)
        close_start = state.get("close_start")
        self.close_start = (int(close_start[0]), float(close_start[1])) if close_start is not None else None
        self.projected = self.fixed  # the keep masks themselves come back with the checkpoint's buffers
        self._set_sampling()

    def project(self) -> None:
        """Keep the ranks with the largest log alpha (the largest gates first), over all matrices, while the size
        fits B: the final size is within one rank cost of B. Ranks whose deterministic gate is 0 may be kept to
        fill the room; they are counted in `closed_kept_ranks`. Ranks closed on the ramp are not candidates."""
        assert self.budget is not None
        candidates = []
        for i, m in enumerate(self.modules):
            with gathered([m.log_alpha]):  # ranks closed on the ramp (lag_response "close") stay closed
                candidates.extend((value, i, j) for j, (value, kept) in
                                  enumerate(zip(m.alphas().detach().tolist(), m.keep.tolist(), strict=True)) if kept)
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        room = self.budget.prunable_allowance
        keep = [torch.zeros_like(m.keep) for m in self.modules]
        for _value, i, j in candidates:
            cost = self.modules[i].rank_cost
            if cost <= room:
                keep[i][j] = True
                room -= cost
        for m, k in zip(self.modules, keep, strict=True):
            m.keep.copy_(k)
        self.projected = True

    def closed_kept_ranks(self) -> int:
        """Kept ranks whose deterministic gate is 0: the room they take does nothing."""
        count = 0
        for m in self.modules:
            with gathered([m.log_alpha]):
                count += int(((m.deterministic_gates(m.alphas().detach()) == 0) & m.keep).sum())
        return count

    def final_report(self, model: nn.Module) -> dict[str, Any]:
        if not self.fixed:
            self.project()
        report = self.kept_report(model)
        report.update({"lambda1": float(self.lambda1), "lambda2": float(self.lambda2),
                       "closed_kept_ranks": self.closed_kept_ranks(),
                       "expected_fraction_at_end": float(self.last_density),
                       # the expected size where the ranks were fixed over the target: 1 when training reached the
                       # size, above it when the final projection had to cut the rest
                       "expected_over_target": float(self.last_density) / self.target(self.schedule_end),
                       "fixed_ranks_from_step": self.schedule_end + 1 if self.fixed else None,
                       "kept_ranks": {f"{kind}.{idx}": int(m.keep.sum()) for kind, idx, m in prunable_modules(model)}})
        return report

    def kept_in(self, module: nn.Module) -> float:
        """Kept parameters of a factorised matrix: exact after the projection, expected before it."""
        if self.projected:
            return int(module.keep.sum()) * module.rank_cost
        with gathered([module.log_alpha]), torch.no_grad():
            return float(module.expected_open()) * module.rank_cost

    def metrics(self) -> dict[str, float]:
        return {**self.kept_metrics(), "pruning/expected_fraction": float(self.last_density),
                "pruning/target_fraction": self.target(self.step), "pruning/lambda1": float(self.lambda1),
                "pruning/lambda2": float(self.lambda2)}

"""Pruning the shared encoder to a parameter budget, as hooks at the optimizer step.

Methods (docs/METHOD.md of the project's design, reconstructed from Sanh et al. 2020 and FLOP, Wang et al. 2020):
- `magnitude`: M = top-v of |W|;
- `movement`: M = top-v of learned scores S (straight-through: dL/dS = dL/dM), per matrix or global;
- `soft_movement`: M = 1[sigmoid(S) > tau] plus lambda_t * mean(sigmoid(S)); projected to the budget at the end;
- `rank`: W = P diag(g) Q from the SVD of W, hard-concrete gates g, augmented Lagrangian on the expected size.

Masks and gates act in the forward pass (never by writing zeros into weights), so ZeRO's master copy cannot undo
them. Masks are recomputed once per optimizer step from the (gathered, under ZeRO-3) scores or weights.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp.config import ConfigError, PruningConfig
from mtp.hooks import Hook
from mtp.model import PRUNABLE_BY_ARCH, encoder_layers, gathered, parameter_counts

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


def allocate(total: int, sizes: list[int], fraction: float) -> list[int]:
    """Split `total` kept entries over matrices in proportion to their sizes (largest remainder), summing exactly."""
    raw = [fraction * n for n in sizes]
    counts = [min(n, int(math.floor(r))) for r, n in zip(raw, sizes, strict=True)]
    rest = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order:
        if rest <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            rest -= 1
    return counts


def kth_largest(values: torch.Tensor, k: int, scratch: bool = False) -> float:
    """The k-th largest entry (1 <= k <= n), by selection rather than sorting: numpy's introselect on CPU
    (an order of magnitude faster than torch.topk there), torch.kthvalue on accelerators. With `scratch`,
    a CPU float32 `values` may be reordered in place (saves a copy)."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu":
        import numpy as np

        arr = flat.float().numpy()
        if scratch and flat.dtype == torch.float32:
            arr.partition(n - k)
            return float(arr[n - k])
        return float(np.partition(arr, n - k)[n - k])
    return float(torch.kthvalue(flat.float(), n - k + 1).values)


def topk_mask(criterion: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask keeping exactly the k largest entries (ties broken by position, deterministically)."""
    return threshold_masks([criterion], k)[0][0]


def threshold_masks(criteria: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], float]:
    """Boolean masks over several tensors keeping exactly the k largest entries of all of them together
    (entries equal to the threshold are taken first by tensor, then by position), and that threshold."""
    masks = [torch.empty_like(c, dtype=torch.bool) for c in criteria]
    return masks, TopK().select(criteria, k, masks)


class TopK:
    """Exact top-k masks, cheap when called again on values that moved a little (once per optimizer step).

    The k-th largest entry is looked for first in a narrow band around the previous threshold: a count of
    the entries above the band says whether the band holds it, and only the band's entries are selected
    from. When the band misses (the first call, a jump in k) a full selection runs and the band widens.
    The result is always exact, with the same tie rule as a full selection, so the selector's state is a
    speed hint only (it is not checkpointed).
    """

    def __init__(self, numpy_on_cpu: bool = True) -> None:
        self.numpy_on_cpu = numpy_on_cpu  # band search through numpy for CPU tensors (torch's path otherwise)
        self.hint: float | None = None  # where the threshold is expected: the last one plus its last move
        self.last: float | None = None
        self.width = 0.0
        self.full_selections = 0

    def select(self, criteria: list[torch.Tensor], k: int, out: list[torch.Tensor]) -> float:
        """Write 0/1 masks keeping exactly the k largest entries of `criteria` into `out` (any dtype) and
        return the threshold; entries equal to it are taken first by tensor, then by position."""
        flats = [c.detach().reshape(-1) for c in criteria]
        n = sum(f.numel() for f in flats)
        if k >= n or k <= 0:
            for m in out:
                m.fill_(1 if k >= n else 0)
            return -math.inf if k >= n else math.inf
        found = self._in_band(flats, k) if self.hint is not None else None
        if found is None:
            threshold = kth_largest(flats[0], k) if len(flats) == 1 else kth_largest(
                torch.cat([f.float() for f in flats]), k, scratch=True)
            above = sum(int(torch.count_nonzero(f > threshold)) for f in flats)
            at_least = above + sum(int(torch.count_nonzero(f == threshold)) for f in flats)
            self.full_selections += 1
            grown = 4 * self.width
        else:
            (threshold, above, at_least), grown = found, 0.75 * self.width  # the band shrinks slowly while it hits
        error = abs(threshold - self.hint) if self.hint is not None else 0.0
        self.width = max(grown, 3 * error, 1e-4 * abs(threshold), 1e-12)
        self.hint = threshold if self.last is None else 2 * threshold - self.last  # linear extrapolation
        self.last = threshold
        if at_least == k:  # the usual case: no other entry equals the threshold
            for c, m in zip(criteria, out, strict=True):
                torch.ge(c.detach(), threshold, out=m)
            return threshold
        for c, m in zip(criteria, out, strict=True):
            torch.gt(c.detach(), threshold, out=m)
        missing = k - above
        for c, m in zip(criteria, out, strict=True):
            if missing <= 0:
                break
            ties = torch.nonzero((c.detach() == threshold).reshape(-1)).squeeze(1)[:missing]
            m.view(-1)[ties] = 1
            missing -= ties.numel()
        return threshold

    def _in_band(self, flats: list[torch.Tensor], k: int) -> tuple[float, int, int] | None:
        """(k-th largest, entries above it, entries at least it) when it lies within hint +- width, else None."""
        assert self.hint is not None
        low, high = self.hint - self.width, self.hint + self.width
        if self.numpy_on_cpu and all(f.device.type == "cpu" for f in flats):  # numpy: 2-5x torch's speed here
            import numpy as np

            arrays = [f.float().numpy() for f in flats]
            above = sum(int(np.count_nonzero(a > high)) for a in arrays)
            if above >= k:
                return None
            pieces = [a[(a > low) & (a <= high)] for a in arrays]
            band = torch.from_numpy(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        else:
            above = sum(int(torch.count_nonzero(f > high)) for f in flats)
            if above >= k:
                return None
            bands = [f[(f > low) & (f <= high)] for f in flats]
            band = bands[0] if len(bands) == 1 else torch.cat(bands)
        if above + band.numel() < k:
            return None
        threshold = kth_largest(band, k - above)
        return (threshold, above + int(torch.count_nonzero(band > threshold)),
                above + int(torch.count_nonzero(band >= threshold)))


# ---------------------------------------------------------------- modules


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


class MaskedLinear(nn.Module):
    """y = (W * M) x + b; with scores, M's gradient flows straight through to S.

    The mask is a 0/1 buffer in the weight's dtype (no conversion in the forward pass); count kept
    entries with `count_nonzero`, never by summing it in low precision.
    """

    def __init__(self, linear: nn.Linear, with_scores: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("mask", torch.ones_like(linear.weight))
        self.scores = nn.Parameter(torch.zeros_like(linear.weight)) if with_scores else None
        self.track_sigmoid = False
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scores is not None and self.training:
            if self.track_sigmoid:
                self.aux = torch.sigmoid(self.scores.float()).sum()
            weight = _StraightThroughMask.apply(self.weight, self.scores, self.mask.to(self.weight.dtype))
        else:
            weight = self.weight * self.mask.to(self.weight.dtype)
        return F.linear(x, weight, self.bias)


class FactorizedLinear(nn.Module):
    """y = P diag(g) Q x + b, initialised from the SVD of W (P = U sqrt(S), Q = sqrt(S) V^T), so it starts as W."""

    def __init__(self, linear: nn.Linear, beta: float, stretch: tuple[float, float], log_alpha_init: float):
        super().__init__()
        weight = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s.sqrt()
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.P = nn.Parameter((u * root).to(dtype).contiguous())  # SVD factors come column-major
        self.Q = nn.Parameter((root[:, None] * vh).to(dtype).contiguous())
        self.bias = linear.bias
        self.log_alpha = nn.Parameter(torch.full((s.numel(),), float(log_alpha_init)))
        self.register_buffer("keep", torch.ones(s.numel(), dtype=torch.bool))
        self.beta, (self.low, self.high) = beta, stretch
        self.sample = True  # the hook turns sampling off outside the pruning ramp (deterministic gates)
        self.aux: torch.Tensor | None = None

    @property
    def rank_cost(self) -> int:
        return self.in_features + self.out_features

    def gates(self) -> torch.Tensor:
        """Hard-concrete samples while training with `sample`, else deterministic gates; dropped ranks are 0."""
        log_alpha = self.log_alpha.float()
        if not (self.training and self.sample):
            return self.deterministic_gates(log_alpha) * self.keep
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0) * self.keep

    def deterministic_gates(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The evaluation gates for these log alpha, before the keep mask: clamp(sigmoid(log alpha) (r - l) + l)."""
        return (torch.sigmoid(log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def expected_open(self) -> torch.Tensor:
        """E[number of non-zero gates] = sum sigmoid(log alpha - beta log(-l/r)) over kept ranks."""
        shift = self.beta * math.log(-self.low / self.high)
        return (torch.sigmoid(self.log_alpha.float() - shift) * self.keep).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates()
        if self.training and self.sample:
            self.aux = self.expected_open()
        open_ranks = torch.nonzero(g > 0).squeeze(1)
        if open_ranks.numel() == 0:
            # every rank closed: the map is its bias. A zero-width product would break ZeRO-3's linear in the
            # backward pass; the zero term keeps P and Q in the graph, so every data-parallel rank reduces the
            # same gradients whichever gates it sampled
            out = x.new_zeros(*x.shape[:-1], self.out_features) + 0 * (self.P.sum() + self.Q.sum()).to(x.dtype)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        if open_ranks.numel() < g.numel():
            # closed gates are exactly 0 (and pass no gradient through the clamp): leave their ranks out
            hidden = F.linear(x, self.Q.index_select(0, open_ranks)) * g.index_select(0, open_ranks).to(x.dtype)
            return F.linear(hidden, self.P.index_select(1, open_ranks), self.bias)
        hidden = F.linear(x, self.Q) * g.to(x.dtype)
        return F.linear(hidden, self.P, self.bias)


def prunable_modules(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(matrix type, layer index, module) for the six prunable maps of every block."""
    found = []
    for idx, layer in enumerate(encoder_layers(model)):
        for kind, path in PRUNABLE_BY_ARCH[model.model_type].items():
            found.append((kind, idx, layer.get_submodule(path)))
    return found


def _replace(model: nn.Module, make: Any) -> None:
    for idx, layer in enumerate(encoder_layers(model)):
        for path in PRUNABLE_BY_ARCH[model.model_type].values():
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            setattr(parent, child, make(getattr(parent, child), idx))


# ---------------------------------------------------------------- hooks


class PruningHook(Hook):
    """Shared by all methods: budget, schedule position, reports of kept parameters."""

    name = "pruning"

    def __init__(self, cfg: PruningConfig, total_steps: int):
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

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fixed": self.fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", 0)
        self.fixed = state.get("fixed", False)


class ElementwisePruning(PruningHook):
    """Magnitude, movement (per matrix or global top-k) and soft movement."""

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        with_scores = self.cfg.method in ("movement", "soft_movement")
        _replace(model, lambda linear, _idx: MaskedLinear(linear, with_scores))
        self.modules = [m for _, _, m in prunable_modules(model)]
        for m in self.modules:
            m.track_sigmoid = self.cfg.method == "soft_movement"
        self.density = 1.0
        self.threshold = 0.0
        self.topk = [TopK() for _ in self.modules]  # per-matrix selectors (their state only makes them fast)
        self.global_topk = TopK()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        scores = [m.scores for m in self.modules if m.scores is not None]
        return [{"params": scores, "lr": self.cfg.score_lr, "weight_decay": 0.0, "name": "scores"}] if scores else []

    def progress(self) -> float:
        """0 before pruning starts, 1 from the cool-down on."""
        return 1.0 - self.schedule(self.step, 1.0, 0.0)

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if self.cfg.method != "soft_movement" or self.cfg.soft_lambda == 0 or self.fixed:
            return None
        total = sum(m.aux for m in self.modules if m.aux is not None)
        assert self.budget is not None
        return self.cfg.soft_lambda * self.progress() * total / self.budget.prunable

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.step = step
        assert self.budget is not None
        if self.fixed:
            return
        if self.in_fixed_phase(step):  # the final masks, kept from here on
            self.final_masks()
            self.fixed = True
            return
        if self.cfg.method == "soft_movement":
            self.threshold = self.cfg.soft_threshold * self.progress()
            # sigmoid(S) > tau  <=>  S > logit(tau): one comparison per entry, no sigmoid
            cut = -math.inf if self.threshold <= 0 else math.inf if self.threshold >= 1 else math.log(
                self.threshold / (1 - self.threshold))
            for m in self.modules:
                with gathered([m.scores]):
                    torch.gt(m.scores.detach(), cut, out=m.mask)
            return
        self.density = self.schedule(step, 1.0, self.budget.density)
        self.update_masks(self.density)

    def _criterion(self, m: MaskedLinear) -> torch.Tensor:
        return m.weight.detach().abs() if m.scores is None else m.scores.detach()

    def update_masks(self, density: float, scope: str | None = None) -> None:
        """Keep the top `density` of the prunable entries: per matrix, or over all matrices at once (`scope`, by
        default pruning.scope)."""
        sizes = [m.mask.numel() for m in self.modules]
        kept_total = int(math.floor(density * sum(sizes))) if density < 1.0 else sum(sizes)
        if density < 1.0 and (scope or self.cfg.scope) == "global":
            criteria = []
            for m in self.modules:
                source = m.weight if m.scores is None else m.scores
                with gathered([source]):  # under ZeRO-3 the gathered values must outlive the context
                    crit = self._criterion(m)
                    criteria.append(crit.clone() if hasattr(source, "ds_id") else crit)
            self.threshold = self.global_topk.select(criteria, kept_total, [m.mask for m in self.modules])
            return
        jobs = list(zip(self.modules, allocate(kept_total, sizes, density), self.topk, strict=True))
        if any(hasattr(m.weight, "ds_id") for m in self.modules):  # ZeRO-3: gather one matrix at a time
            thresholds = []
            for m, k, topk in jobs:
                with gathered([m.weight] if m.scores is None else [m.scores]):
                    thresholds.append(topk.select([self._criterion(m)], k, [m.mask]))
            self._record_threshold(thresholds)
            return
        self._record_threshold([topk.select([self._criterion(m)], k, [m.mask]) for m, k, topk in jobs])

    def _record_threshold(self, thresholds: list[float]) -> None:
        """Per matrix, the reported threshold is the median of the matrices' (0 while nothing is pruned)."""
        finite = [t for t in thresholds if math.isfinite(t)]
        self.threshold = statistics.median(finite) if finite else 0.0

    def final_masks(self) -> None:
        """The masks at the budget: the final top-k; soft movement, which does not hit the budget by itself, is
        projected to it (global top-k of its scores)."""
        assert self.budget is not None
        self.density = self.budget.density
        self.update_masks(self.density, scope="global" if self.cfg.method == "soft_movement" else None)

    def on_train_end(self, model: nn.Module) -> dict[str, Any]:
        if self.cfg.method == "soft_movement" and not self.fixed:
            self.final_masks()
        return {**self.kept_report(model), "fixed_masks_from_step": self.schedule_end + 1 if self.fixed else None}

    def kept_in(self, module: nn.Module) -> int:
        return int(module.mask.count_nonzero())

    def metrics(self) -> dict[str, float]:
        assert self.budget is not None
        return {**self.kept_metrics(), "pruning/target_density": self.density, "pruning/threshold": self.threshold}


class RankPruning(PruningHook):
    """FLOP-style rank pruning with hard-concrete gates and an augmented Lagrangian on the expected size."""

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        c = self.cfg
        _replace(model, lambda linear, _idx: FactorizedLinear(linear, c.gate_beta, (c.gate_low, c.gate_high),
                                                              c.log_alpha_init))
        self.modules = [m for _, _, m in prunable_modules(model)]
        self.lambda1 = 0.0
        # lambda2 starts as a real quadratic penalty (method of multipliers): its pull 2 lambda2 (s - t) follows the
        # gap at once, where lambda1 only integrates it; from 0, lambda1 alone wound up while the saturated gates
        # lagged and then overshot (a 1,000-step MiniLM run ended at 0.40 of the blocks for B = 0.5)
        self.lambda2 = c.lambda2_init
        self.projected = False
        self.start_density = self.expected_density().item()
        self.last_density = self.start_density
        self._set_sampling()

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
        size = sum(m.rank_cost * m.aux for m in self.modules if m.aux is not None)
        density = (size + self.budget.non_prunable) / self.budget.dense_blocks
        gap = density - self.target(step)
        self.last_density = float(density.detach())
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Gradient ascent on the multipliers: d/d(lambda1) = gap, d/d(lambda2) = gap^2; at the end of the schedule
        the ranks are projected to the budget and fixed for the fine-tuning phase."""
        sampled = self.modules[0].sample
        self.step = step
        if not self.fixed and self.in_fixed_phase(step):
            self.project()
            self.fixed = True
        elif sampled:
            gap = self.last_density - self.target(step)
            self.lambda1 += self.cfg.lagrangian_lr * gap
            self.lambda2 += self.cfg.lagrangian_lr * gap * gap
        self._set_sampling()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fixed": self.fixed, "lambda1": self.lambda1, "lambda2": self.lambda2,
                "start_density": self.start_density, "last_density": self.last_density}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lambda1, self.lambda2 = state.get("lambda1", 0.0), state.get("lambda2", 0.0)
        self.start_density = state.get("start_density", self.start_density)
        self.last_density = state.get("last_density", self.last_density)
        self.projected = self.fixed  # the keep masks themselves come back with the checkpoint's buffers
        self._set_sampling()

    def project(self) -> None:
        """Keep the ranks with the largest log alpha (the largest gates first), over all matrices, while the size
        fits B: the final size is within one rank cost of B. Ranks whose deterministic gate is 0 may be kept to
        fill the room; they are counted in `closed_kept_ranks`."""
        assert self.budget is not None
        candidates = []
        for i, m in enumerate(self.modules):
            with gathered([m.log_alpha]):
                candidates.extend((value, i, j) for j, value in enumerate(m.log_alpha.detach().float().tolist()))
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
                count += int(((m.deterministic_gates(m.log_alpha.detach().float()) == 0) & m.keep).sum())
        return count

    def on_train_end(self, model: nn.Module) -> dict[str, Any]:
        if not self.fixed:
            self.project()
        report = self.kept_report(model)
        report.update({"lambda1": self.lambda1, "lambda2": self.lambda2, "closed_kept_ranks": self.closed_kept_ranks(),
                       "expected_fraction_at_end": self.last_density,
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
        return {**self.kept_metrics(), "pruning/expected_fraction": self.last_density,
                "pruning/target_fraction": self.target(self.step), "pruning/lambda1": self.lambda1,
                "pruning/lambda2": self.lambda2}


def build_pruning(cfg: PruningConfig, total_steps: int) -> list[Hook]:
    """The hooks for `pruning.method` (none: no hook)."""
    if cfg.method == "none":
        return []
    if cfg.method == "rank":
        return [RankPruning(cfg, total_steps)]
    return [ElementwisePruning(cfg, total_steps)]

"""Pruning methods against references: SVD factorisation, exact top-k, the cubic schedule, expected L0, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtp.config import ConfigError
from mtp.model import MultitaskModel, load_encoder, parameter_counts
from mtp.pruning import (
    FactorizedLinear,
    MaskedLinear,
    RankPruning,
    TopK,
    allocate,
    build_pruning,
    cubic_schedule,
    make_budget,
    prunable_modules,
    pruning_settings,
    topk_mask,
)


def tiny_model(arch: str = "tiny-bert") -> MultitaskModel:
    torch.manual_seed(0)
    encoder = load_encoder(f"configs/arch/{arch}", random_init=True)
    return MultitaskModel(encoder, {"rte": 2, "stsb": 1})


def test_svd_factorisation_reproduces_the_pretrained_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    layer = FactorizedLinear(linear, beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5).eval()
    assert layer.P.shape == (32, 32) and layer.Q.shape == (32, 48)
    torch.testing.assert_close(layer.P @ layer.Q, linear.weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    assert torch.all(layer.gates() == 1.0)  # log alpha 2.5: every deterministic gate is open


def test_a_factorised_map_with_every_rank_closed_is_its_bias_under_zero3_linear(monkeypatch) -> None:
    """Found on a GPU: once a ZeRO-3 engine exists, DeepSpeed routes F.linear through its own autograd function,
    whose backward fails on a zero-width product. A map whose ranks are all closed must give its bias, and P and
    Q must still get (zero) gradients, so that every data-parallel rank reduces the same tensors."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    import mtp.pruning.rank as pruning

    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5)
    with torch.no_grad():
        layer.log_alpha.fill_(-50.0)  # every sampled gate is 0
    monkeypatch.setattr(pruning.F, "linear", zero3_linear_wrap)
    x = torch.randn(3, 5, 24, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        out = layer(x)
        torch.testing.assert_close(out, layer.bias.detach().expand(3, 5, 16))
        out.sum().backward()
    assert torch.equal(layer.P.grad, torch.zeros_like(layer.P)) and torch.equal(layer.Q.grad, torch.zeros_like(layer.Q))
    torch.testing.assert_close(layer.bias.grad, torch.full((16,), 30.0))


def test_hard_concrete_expected_l0_matches_sampling() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(16, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=0.0).train()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-3, 3, 16))
    closed_form = float(layer.expected_open())
    by_hand = sum(1 / (1 + math.exp(-(a - (2 / 3) * math.log(0.1 / 1.1)))) for a in torch.linspace(-3, 3, 16).tolist())
    assert closed_form == pytest.approx(by_hand, rel=1e-6)
    samples = torch.stack([layer.gates() for _ in range(20000)])
    assert float((samples > 0).float().sum(1).mean()) == pytest.approx(closed_form, rel=0.02)


def test_topk_keeps_exactly_k_and_allocation_sums_exactly() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.5]])
    mask = topk_mask(scores, 4)
    assert int(mask.sum()) == 4 and bool(mask[1, 1]) and not bool(mask[1, 0])
    assert int(topk_mask(scores, 0).sum()) == 0 and int(topk_mask(scores, 99).sum()) == 6
    sizes = [1000, 4000, 3, 777]
    for fraction in (0.1, 0.333, 0.5, 0.999):
        total = math.floor(fraction * sum(sizes))
        counts = allocate(total, sizes, fraction)
        assert sum(counts) == total and all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))


def reference_masks(criteria: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest entries by a stable full sort: larger first, ties by tensor, then by position."""
    flat = torch.cat([c.reshape(-1) for c in criteria])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return [part.view_as(c) for part, c in zip(keep.split([c.numel() for c in criteria]), criteria, strict=True)]


@pytest.mark.parametrize("tensors", [1, 3])
@pytest.mark.parametrize("numpy_on_cpu", [True, False])  # False: the path accelerators take
def test_incremental_topk_matches_a_full_sort_as_values_drift(tensors: int, numpy_on_cpu: bool) -> None:
    """The banded selection (previous threshold as a hint) against a full stable sort, step after step:
    small drifts (the band hits), a jump of the values and of k (it misses), ties at the threshold."""
    torch.manual_seed(0)
    criteria = [torch.randn(64, 48) for _ in range(tensors)]
    n = sum(c.numel() for c in criteria)
    selector = TopK(numpy_on_cpu)
    for step in range(40):
        for c in criteria:
            c.add_(torch.randn_like(c), alpha=1e-3 if step != 20 else 1.0)
        if step == 30:  # many entries equal to the threshold: ties taken by tensor, then position
            for c in criteria:
                c.view(-1)[::3] = 0.25
        k = n // 4 if step < 25 else n // 10 + step
        masks = [torch.empty_like(c) for c in criteria]
        selector.select(criteria, k, masks)
        for mask, ref in zip(masks, reference_masks(criteria, k), strict=True):
            assert torch.equal(mask.bool(), ref), f"step {step}"
        assert sum(int(m.count_nonzero()) for m in masks) == k
    assert selector.full_selections <= 8  # the band normally answers; full selections at the first call and jumps


def test_cubic_schedule_break_points() -> None:
    kw = {"total": 100, "warmup": 10, "cooldown": 20, "start": 1.0, "end": 0.1}
    assert cubic_schedule(0, **kw) == 1.0 and cubic_schedule(10, **kw) == 1.0
    assert cubic_schedule(81, **kw) == 0.1 and cubic_schedule(100, **kw) == 0.1
    # halfway through the ramp (step 45 of 10..80): v_f + (v0 - v_f) * (1 - 0.5)^3
    assert cubic_schedule(45, **kw) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cubic_schedule(80, **kw) == pytest.approx(0.1)


def test_first_step_at_budget_by_hand() -> None:
    from mtp.pruning.base import first_step_at_budget

    # 100 steps, the last 25 at fixed masks: the schedule spans 75 steps, dense to step 10, ramp over 10..70
    # (75 - 10 - 5 steps), at the budget for its last 5: the target first equals the budget at step 70
    settings = pruning_settings(method="magnitude", budget=0.5, warmup_ratio=0.1, cooldown_ratio=0.05,
                                finetune_ratio=0.25)
    assert first_step_at_budget(settings, 100) == 70
    no_phases = pruning_settings(method="movement", budget=0.5, warmup_ratio=0.0, cooldown_ratio=0.0)
    assert first_step_at_budget(no_phases, 10) == 10  # the ramp ends with the run
    assert first_step_at_budget(pruning_settings(method="none"), 100) == 0


def test_budget_arithmetic_for_bert_base_by_hand() -> None:
    with torch.device("meta"):
        model = MultitaskModel(load_encoder("configs/arch/bert-base-uncased", random_init=True),
                               {"rte": 2})
    counts = parameter_counts(model)
    # per block: Q, K, V, attention output 768x768; FFN 3072x768 and 768x3072
    prunable = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    # biases (4*768 + 3072 + 768) and two LayerNorms (2 * 2 * 768) per block
    non_prunable = 12 * (4 * 768 + 3072 + 768 + 4 * 768)
    assert counts["prunable"] == prunable == 84_934_656
    assert counts["non_prunable_blocks"] == non_prunable == 119_808
    budget = make_budget(counts, 0.10)
    assert budget.target == math.floor(0.10 * 85_054_464) == 8_505_446
    assert budget.density == pytest.approx((8_505_446 - 119_808) / 84_934_656)
    assert make_budget(counts, 5_000_000).target == 5_000_000
    # a rank-r factor of a 768x768 matrix costs r * (768 + 768): it saves nothing until r < 384
    assert 384 * (768 + 768) == 768 * 768
    with pytest.raises(ConfigError, match="infeasible: the non-prunable block parameters"):
        make_budget(counts, 0.001)
    with pytest.raises(ConfigError, match="exceeds the dense encoder blocks"):
        make_budget(counts, 90_000_000)


@pytest.mark.parametrize("scope", ["per_matrix", "global"])
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_elementwise_masks_hit_the_budget_exactly(method: str, scope: str) -> None:
    model = tiny_model()
    hook = build_pruning(pruning_settings(method=method, budget=0.3, scope=scope), 10)[0]
    hook.setup(model)
    modules = [m for _, _, m in prunable_modules(model)]
    assert all(isinstance(m, MaskedLinear) for m in modules)
    for m in modules:
        if m.scores is not None:
            m.scores.data.normal_()
    hook.on_optimizer_step(model, 10)  # past the cool-down start: the final density
    report = hook.kept_report(model)
    budget = hook.budget
    assert report["kept_blocks"] == budget.non_prunable + math.floor(budget.density * budget.prunable)
    assert report["within_budget"] and budget.target - report["kept_blocks"] <= 1
    if scope == "per_matrix":
        for m in modules:
            assert abs(int(m.mask.sum()) - budget.density * m.mask.numel()) <= 1


def test_masks_act_in_the_forward_pass_with_straight_through_scores() -> None:
    torch.manual_seed(0)
    layer = MaskedLinear(nn.Linear(6, 4), with_scores=True).train()
    layer.mask[:, :3] = False
    x = torch.randn(2, 6)
    expected = x @ (layer.weight * layer.mask).T + layer.bias
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    # dL/dS = dL/dM = dL/dW_eff * W: nonzero for pruned entries too (they can come back)
    grad_weff = torch.ones(2, 4).T @ x
    torch.testing.assert_close(layer.scores.grad, grad_weff * layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, grad_weff * layer.mask)


def test_soft_movement_projects_to_the_budget_at_the_end() -> None:
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="soft_movement", budget=0.25), 10)[0]
    hook.setup(model)
    for _, _, m in prunable_modules(model):
        m.scores.data.normal_()
    for step in (0, 5, 10):  # the mask is 1[sigmoid(S) > tau_t], computed as S > logit(tau_t)
        hook.on_optimizer_step(model, step)
        for _, _, m in prunable_modules(model):
            assert torch.equal(m.mask.bool(), torch.sigmoid(m.scores.detach()) > hook.threshold)
    assert 0 < hook.threshold == hook.cfg.soft_threshold
    report = hook.on_train_end(model)
    assert report["within_budget"]
    assert hook.budget.target - report["kept_blocks"] <= 1


def test_rank_pruning_projects_within_budget_and_counts_rank_cost() -> None:
    model = tiny_model("tiny-roberta")
    hook = build_pruning(pruning_settings(method="rank", budget=0.3), 10)[0]
    hook.setup(model)
    modules = [m for _, _, m in prunable_modules(model)]
    assert all(isinstance(m, FactorizedLinear) for m in modules)
    assert hook.start_density > 1.0  # a full-rank factorisation is larger than the dense matrices
    for m in modules:
        m.log_alpha.data.normal_()
    report = hook.on_train_end(model)
    budget = hook.budget
    kept = sum(int(m.keep.sum()) * (m.in_features + m.out_features) for m in modules)
    assert report["kept_blocks"] == kept + budget.non_prunable <= budget.target
    # as close as the granularity allows: no dropped rank would still fit
    room = budget.target - report["kept_blocks"]
    assert all(m.in_features + m.out_features > room for m in modules if int(m.keep.sum()) < m.keep.numel())


def test_lagrangian_ascent_raises_multipliers_when_over_target() -> None:
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="rank", budget=0.3, warmup_ratio=0.0, cooldown_ratio=0.0), 10)[0]
    hook.setup(model.train())
    x = torch.randint(1, 100, (2, 5))
    model("rte", input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 1]))
    penalty = hook.extra_loss(model, 10)
    gap = hook.last_density - hook.target(10)
    # lambda1 starts at 0, lambda2 at lambda2_init
    assert gap > 0 and float(penalty.detach()) == pytest.approx(hook.cfg.lambda2_init * gap * gap)
    hook.on_optimizer_step(model, 10)
    assert hook.lambda1 > 0 and hook.lambda2 > hook.cfg.lambda2_init  # expected size above the target: both grow
    model("rte", input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 1]))
    penalty = hook.extra_loss(model, 10)
    penalty.backward()
    assert all(m.log_alpha.grad is not None and float(m.log_alpha.grad.sum()) > 0
               for _, _, m in prunable_modules(model))  # descent lowers log alpha: smaller expected size


@pytest.mark.parametrize("arch", ["bert-large-uncased", "roberta-large"])
def test_large_architectures_are_pruned_by_architecture_map(arch: str) -> None:
    with torch.device("meta"):
        model = MultitaskModel(load_encoder(f"configs/arch/{arch}", random_init=True),
                               {"rte": 2})
    hook = build_pruning(pruning_settings(method="movement", budget=0.1), 100)[0]
    hook.setup(model)
    kinds = [(kind, idx) for kind, idx, m in prunable_modules(model) if isinstance(m, MaskedLinear)]
    assert len(kinds) == 24 * 6
    assert hook.budget.prunable == 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)


def test_rank_factorisation_of_a_roberta_base_block() -> None:
    torch.manual_seed(0)
    encoder = load_encoder("configs/arch/roberta-base", random_init=True, config_overrides={"num_hidden_layers": 1})
    model = MultitaskModel(encoder, {"rte": 2}).eval()
    x = torch.randint(5, 1000, (2, 11))
    before = model("rte", input_ids=x, attention_mask=torch.ones_like(x))["logits"]
    hook = build_pruning(pruning_settings(method="rank", budget=0.5), 10)[0]
    hook.setup(model)
    model.eval()  # the new factorised layers are built in training mode
    after = model("rte", input_ids=x, attention_mask=torch.ones_like(x))["logits"]
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # starts as exactly the pretrained map
    ffn_in = next(m for kind, _, m in prunable_modules(model) if kind == "ffn_in")
    assert ffn_in.P.shape == (3072, 768) and ffn_in.Q.shape == (768, 768)


def rank_closed_loop(steps: int, **overrides: float) -> tuple[RankPruning, nn.Module, float]:
    """Train a tiny model's gates as in training (task loss plus the Lagrangian, AdamW); returns the hook, the model
    and the largest |expected size - target| once the ramp is under way (after 30% of the steps)."""
    torch.manual_seed(0)
    model = tiny_model().train()
    cfg = pruning_settings(method="rank", budget=0.3, warmup_ratio=0.1, cooldown_ratio=0.2, **overrides)
    hook = build_pruning(cfg, steps)[0]
    hook.setup(model)
    groups = hook.param_groups(model)
    gates = {id(p) for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in gates], "lr": 1e-3},
                                   *groups])
    worst_gap = 0.0
    for step in range(steps):
        x = torch.randint(1, 1000, (8, 12))
        labels = (x[:, 0] % 2).long()
        loss = model("rte", input_ids=x, attention_mask=torch.ones_like(x), labels=labels)["loss"]
        extra = hook.extra_loss(model, step)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.on_optimizer_step(model, step + 1)
        if step > steps * 0.3:
            worst_gap = max(worst_gap, abs(hook.last_density - hook.target(step + 1)))
    return hook, model, worst_gap


def test_rank_gates_track_the_target_and_end_at_the_budget() -> None:
    """The expected size follows the cubic target closely and ends within 0.01 of B (as fractions of the dense
    blocks); with lambda2 from 0 (plain FLOP ascent) the same loop swings far off the target."""
    hook, model, worst_gap = rank_closed_loop(400)
    end = hook.budget.target / hook.budget.dense_blocks
    assert abs(hook.last_density - end) < 0.01, (hook.last_density, end)
    assert worst_gap < 0.05, worst_gap
    _, _, plain_worst_gap = rank_closed_loop(400, lambda2_init=0.0)
    assert plain_worst_gap > 0.2, plain_worst_gap
    report = hook.on_train_end(model)
    assert report["within_budget"] and report["expected_fraction_at_end"] == hook.last_density
    assert hook.budget.target - report["kept_blocks"] < max(m.rank_cost for m in hook.modules)


def test_a_four_times_shorter_run_tracks_the_target_with_four_times_the_rates() -> None:
    """Gates and multipliers move about their learning rates a step, so a run a quarter as long lags the target and
    ends above B at the default rates, and tracks it with both rates scaled by four (what the long comparison's
    250-step single-task rank runs use beside its 1,000-step multitask ones)."""
    slow, _, _ = rank_closed_loop(100)
    end = slow.budget.target / slow.budget.dense_blocks
    assert slow.last_density - end > 0.05, (slow.last_density, end)
    scaled, _, worst_gap = rank_closed_loop(100, gate_lr=0.2, lagrangian_lr=0.4)
    assert abs(scaled.last_density - end) < 0.01 and worst_gap < 0.25, (scaled.last_density, worst_gap)


def test_rank_projection_fills_the_budget_from_the_largest_log_alpha() -> None:
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="rank", budget=0.3), 10)[0]
    hook.setup(model)
    torch.manual_seed(1)
    for m in hook.modules:
        m.log_alpha.data = torch.randn_like(m.log_alpha) - 4.0  # most deterministic gates closed
    open_before = sum(int((m.gates() > 0).sum()) for m in [m.eval() for m in hook.modules])
    report = hook.on_train_end(model)
    budget = hook.budget
    assert report["within_budget"] and budget.target - report["kept_blocks"] < max(m.rank_cost for m in hook.modules)
    kept = sum(int(m.keep.sum()) for m in hook.modules)
    assert kept > open_before and report["closed_kept_ranks"] == kept - open_before
    # every dropped rank has a log alpha no larger than every kept rank of the same cost
    for cost in {m.rank_cost for m in hook.modules}:
        same = [m for m in hook.modules if m.rank_cost == cost]
        kept_min = min(float(m.log_alpha[m.keep].min()) for m in same if m.keep.any())
        dropped = [float(m.log_alpha[~m.keep].max()) for m in same if (~m.keep).any()]
        assert not dropped or max(dropped) <= kept_min

"""Element-wise methods (magnitude, movement, soft movement): exact budgets, masks in the forward pass, straight-through
scores, soft movement's projection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtp.pruning import (
    MaskedLinear,
    build_pruning,
    prunable_modules,
    pruning_settings,
)
from mtp.pruning.elementwise import BlockScores
from tests.unit.pruning.tiny import tiny_model


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
    """Two masked maps in one block: each output uses W * M, and dL/dS = dL/dW_eff * W lands in that map's piece of
    the block's one score parameter (by one split per pass of the block), for every pass of the block."""
    torch.manual_seed(0)
    block = nn.Sequential(MaskedLinear(nn.Linear(6, 4)), MaskedLinear(nn.Linear(4, 3))).train()
    scores = BlockScores(block, [("0", block[0]), ("1", block[1])], torch.float32, torch.device("cpu")).param
    assert scores.shape == (24 + 12,) and [name for name, _ in block.named_parameters()][0] == "mtp_scores"
    first, second = block
    first.mask[:, :3] = False
    second.mask[0] = False
    x = torch.randn(2, 6)
    hidden = x @ (first.weight * first.mask).T + first.bias
    torch.testing.assert_close(block(x), hidden @ (second.weight * second.mask).T + second.bias)
    for passes in (1, 2):  # the second pass accumulates a gradient equal to the first
        scores.grad = None
        for _ in range(passes):
            block(x).sum().backward()
        # dL/dS = dL/dM = dL/dW_eff * W: nonzero for pruned entries too (they can come back)
        grad_out = torch.ones(2, 3)
        grad_second = grad_out.T @ hidden.detach()
        grad_first = ((grad_out @ (second.weight * second.mask)).T @ x).detach()
        torch.testing.assert_close(scores.grad[:24].view(4, 6), passes * grad_first * first.weight.detach())
        torch.testing.assert_close(scores.grad[24:].view(3, 4), passes * grad_second * second.weight.detach())
        torch.testing.assert_close(first.score_grad, passes * grad_first * first.weight.detach())
        torch.testing.assert_close(first.weight.grad, passes * grad_first * first.mask)
        torch.testing.assert_close(second.weight.grad, passes * grad_second * second.mask)
        first.weight.grad = second.weight.grad = first.bias.grad = second.bias.grad = None


def test_a_copied_movement_model_keeps_its_saved_layout_and_learns_its_own_scores() -> None:
    """`copy.deepcopy` of a model with block scores: the copy saves each matrix's `PATH.scores` and its passes write
    gradients into its own score parameters, not the original's."""
    import copy

    from mtp.zero3 import full_state_dict

    model = tiny_model().train()
    hook = build_pruning(pruning_settings(method="movement", budget=0.3), 10)[0]
    hook.setup(model)
    twin = copy.deepcopy(model)
    keys = set(full_state_dict(twin))
    paths = [name for name, m in twin.named_modules() if isinstance(m, MaskedLinear)]
    assert {f"{p}.scores" for p in paths} <= keys and not any(k.endswith("mtp_scores") for k in keys)
    ids = torch.randint(0, twin.encoder.config.vocab_size, (2, 5))
    twin.encoder(input_ids=ids).last_hidden_state.sum().backward()
    copied = [p for name, p in twin.named_parameters() if name.endswith("mtp_scores")]
    assert copied and all(p.grad is not None for p in copied)
    assert all(p.grad is None for p in hook.score_params)


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
    report = hook.final_report(model)
    assert report["within_budget"]
    assert hook.budget.target - report["kept_blocks"] <= 1


def test_soft_movement_reports_what_its_threshold_kept_before_the_projection() -> None:
    """The size soft movement reached by itself where the masks are fixed, over its target: what `mtp compare` warns
    about when λ did not land near the budget; kept across a resume."""
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="soft_movement", budget=0.25, finetune_ratio=0.2), 10)[0]
    hook.setup(model)
    for _, _, m in prunable_modules(model):
        m.scores.data.normal_()
    hook.on_optimizer_step(model, 8)  # the end of the schedule: tau = 0.1, the masks are sigmoid(S) > 0.1
    budget = hook.budget
    above = sum(int((torch.sigmoid(m.scores.detach()) > 0.1).sum()) for _, _, m in prunable_modules(model))
    before = (above + budget.non_prunable) / budget.dense_blocks
    hook.on_optimizer_step(model, 9)  # the fixed-mask phase: projected to the budget
    saved = hook.state_dict()
    report = hook.final_report(model)
    assert report["within_budget"] and report["kept_fraction_before_cut"] == pytest.approx(before)
    assert report["expected_over_target"] == pytest.approx(before / report["budget_fraction"])
    assert report["expected_over_target"] > 3  # N(0, 1) scores: about 98% above the threshold, four times the target
    resumed = build_pruning(pruning_settings(method="soft_movement", budget=0.25, finetune_ratio=0.2), 10)[0]
    resumed.setup(tiny_model())
    resumed.load_state_dict(saved)
    assert resumed.final_report(resumed.model)["kept_fraction_before_cut"] == pytest.approx(before)


@pytest.mark.parametrize("method", ["movement", "soft_movement"])
def test_scores_stop_learning_once_the_masks_are_fixed(method: str) -> None:
    """From the fixed-mask phase on the scores take no part in the forward pass (no gradient, no regulariser term),
    the masks stay as they are, and a hook loaded from a checkpoint in that phase does the same."""
    torch.manual_seed(0)
    model = tiny_model().train()
    hook = build_pruning(pruning_settings(method=method, budget=0.3, finetune_ratio=0.3, cooldown_ratio=0.1), 10)[0]
    hook.setup(model)
    modules = [m for _, _, m in prunable_modules(model)]
    for m in modules:
        m.scores.data.normal_()
    ids = torch.randint(0, model.encoder.config.vocab_size, (2, 5))

    def backward() -> None:
        for param in hook.score_params:
            param.grad = None
        model.encoder(input_ids=ids).last_hidden_state.sum().backward()

    hook.on_optimizer_step(model, 5)  # on the ramp: the scores learn
    backward()
    assert all(m.score_grad is not None and m.scores.requires_grad for m in modules)
    hook.on_optimizer_step(model, 8)  # past the schedule's end (7): the masks are fixed
    assert hook.fixed
    masks = [m.mask.clone() for m in modules]
    backward()
    assert all(m.score_grad is None and not m.scores.requires_grad for m in modules)
    assert hook.extra_loss(model, 8) is None
    hook.on_optimizer_step(model, 9)
    assert all(torch.equal(m.mask, before) for m, before in zip(modules, masks, strict=True))
    resumed = build_pruning(pruning_settings(method=method, budget=0.3, finetune_ratio=0.3, cooldown_ratio=0.1),
                            10)[0]
    fresh = tiny_model().train()
    resumed.setup(fresh)
    resumed.load_state_dict(hook.state_dict())
    assert not any(m.scores.requires_grad for _, _, m in prunable_modules(fresh))


def test_soft_movements_regulariser_is_the_mean_sigmoid_of_every_score_taken_once_per_block() -> None:
    """lambda_t * sum over every matrix of sum(sigmoid(S)) / prunable weights, computed per encoder block in its
    forward pass (one term per block), with its gradient sigmoid'(S) * lambda_t / prunable on every score."""
    torch.manual_seed(0)
    model = tiny_model().train()
    hook = build_pruning(pruning_settings(method="soft_movement", budget=0.3, soft_lambda=50.0), 10)[0]
    hook.setup(model)
    modules = [m for _, _, m in prunable_modules(model)]
    with torch.no_grad():
        for param in hook.score_params:
            param.normal_()
    hook.on_optimizer_step(model, 5)
    weight = hook.cfg.soft_lambda * hook.progress() / hook.budget.prunable
    assert 0 < hook.progress() < 1
    model.encoder(input_ids=torch.randint(0, model.encoder.config.vocab_size, (2, 5)))
    loss = hook.extra_loss(model, 5)
    expected = weight * sum(torch.sigmoid(m.scores.detach()).sum() for m in modules)
    torch.testing.assert_close(loss, expected)
    assert len([b for b in hook.blocks if b.aux is not None]) == len(hook.blocks) == len(modules) // 6
    loss.backward()
    for m in modules:
        s = torch.sigmoid(m.scores.detach())
        torch.testing.assert_close(m.score_grad, weight * s * (1 - s))

"""The structured method's criteria and its greedy fill, against references written out by hand."""

from __future__ import annotations

import pytest
import torch

from mtp.pruning import build_pruning, pruning_settings
from mtp.pruning.structured import StructuredPruning, greedy_fill

from .tiny import tiny_model


def loop_fill(importance: torch.Tensor, heads: int, head_cost: int, unit_cost: int, allowance: int) -> torch.Tensor:
    """The greedy fill as a plain loop: the reference for the vectorised one."""
    keep = torch.zeros(importance.numel(), dtype=torch.bool)
    room = allowance
    for index in torch.argsort(importance, descending=True, stable=True).tolist():
        cost = head_cost if index < heads else unit_cost
        if cost <= room:
            keep[index] = True
            room -= cost
    return keep


def test_greedy_fill_matches_the_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        heads = int(torch.randint(1, 12, (1,), generator=generator))
        units = int(torch.randint(1, 60, (1,), generator=generator))
        head_cost, unit_cost = (int(c) for c in torch.randint(1, 40, (2,), generator=generator))
        importance = torch.rand(heads + units, generator=generator)
        if trial % 3 == 0:
            importance = importance.round(decimals=1)  # ties: the stable order decides on both sides
        allowance = int(torch.randint(0, heads * head_cost + units * unit_cost + 5, (1,), generator=generator))
        assert torch.equal(greedy_fill(importance, heads, head_cost, unit_cost, allowance),
                           loop_fill(importance, heads, head_cost, unit_cost, allowance)), trial


def structured(model: torch.nn.Module, budget: float, steps: int = 20, **keys: object) -> StructuredPruning:
    hook = build_pruning(pruning_settings(method="structured", budget=budget, **keys), steps)[0]
    hook.setup(model)
    return hook


def test_taylor_gate_gradient_is_the_first_order_estimate() -> None:
    """|dL/dg| of a head's gate equals |sum over its output-map columns of W * dL/dW| (Michel et al.'s head
    importance), and a unit's that of its FFN output column; the heads' and units' averages are per parameter."""
    model = tiny_model()
    hook = structured(model, 0.5)
    model.train()
    ids = torch.randint(5, 90, (4, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loss = model("rte", **batch, labels=torch.tensor([0, 1, 1, 0]))["loss"]
    loss.backward()
    for maps in hook.maps:
        out, ffn = maps["attn_out"], maps["ffn_out"]
        per_column = (out.weight.grad * out.weight).sum(0)
        expected_heads = per_column.reshape(hook.heads, hook.head_dim).sum(1).abs()
        torch.testing.assert_close(out.taylor, expected_heads, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ffn.taylor, (ffn.weight.grad * ffn.weight).sum(0).abs(), rtol=1e-4, atol=1e-7)
    expected = torch.cat([torch.stack([m["attn_out"].taylor for m in hook.maps]).flatten() / hook.head_cost,
                          torch.stack([m["ffn_out"].taylor for m in hook.maps]).flatten() / hook.unit_cost])
    hook.on_optimizer_step(model, 1)
    assert hook.taylor_average is not None
    torch.testing.assert_close(hook.taylor_average, expected)
    assert all(float(m["attn_out"].taylor.abs().sum()) == 0 for m in hook.maps)  # reset for the next step


@pytest.mark.parametrize("share", [None, 0.3333])
def test_taylor_removes_a_dead_head_first_and_stays_within_budget(share: float | None) -> None:
    """A head whose output columns are zero changes nothing when removed: the Taylor criterion drops it first, with
    heads and units competing freely (share None) and with the heads' share (the default)."""
    model = tiny_model()
    hook = structured(model, 0.9, steps=10, warmup_ratio=0.3, cooldown_ratio=0.1, attention_share=share)
    with torch.no_grad():
        hook.maps[1]["attn_out"].weight[:, :hook.head_dim] = 0.0
    generator = torch.Generator().manual_seed(2)
    model.train()
    for step in range(1, 11):
        ids = torch.randint(5, 90, (4, 12), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        model("rte", **batch, labels=torch.tensor([0, 1, 1, 0]))["loss"].backward()
        model.zero_grad()
        hook.on_optimizer_step(model, step)
    assert not bool(hook.kept_heads[1, 0])
    report = hook.final_report(model)
    assert report["within_budget"]
    assert hook.budget is not None and hook.budget.target - report["kept_blocks"] < hook.head_cost


def test_magnitude_criterion_ignores_data() -> None:
    model = tiny_model()
    hook = structured(model, 0.5, criterion="magnitude")
    assert all(m["attn_out"].taylor is None for m in hook.maps)
    heads, units = hook.importance()
    assert heads.shape == (len(hook.maps), hook.heads) and units.shape == (len(hook.maps), hook.units)


def test_attention_share_splits_the_budget_between_heads_and_units() -> None:
    """With `attention_share` the heads take their share of the kept groups' parameters (less than one head short of
    it), the units fill what is left (less than one unit short of the budget), and each kind is chosen by its own
    importance: the same heads as a fill over heads alone, the same units as a fill over units alone. A share the
    kinds cannot hold is clipped: at most every head, at least what every unit leaves (then one head short of B)."""
    cases = {(0.6, 0.5): (2, False), (0.6, 1.0): (4, False), (0.9, 0.0): (3, True), (0.4, 0.0): (0, False)}
    for (budget, share), (heads_kept, units_full) in cases.items():
        model = tiny_model()  # 2 layers of 2 heads (2,096 each) and 64 units (65 each)
        hook = structured(model, budget, steps=10, criterion="magnitude", attention_share=share)
        hook.final_masks()
        assert hook.budget is not None
        all_units = hook.removable - hook.all_heads_cost
        wanted = min(max(int(share * hook.allowance), hook.allowance - all_units), hook.all_heads_cost)
        heads_spent = int(hook.kept_heads.sum()) * hook.head_cost
        assert int(hook.kept_heads.sum()) == heads_kept and wanted - hook.head_cost < heads_spent <= wanted
        assert bool(hook.kept_units.all()) == units_full
        report = hook.final_report(model)
        short = hook.budget.target - report["kept_blocks"]
        assert report["within_budget"] and short < (hook.head_cost if units_full else hook.unit_cost), (budget, share)
        heads, units = hook.importance()
        assert torch.equal(hook.kept_heads.flatten(),
                           loop_fill(heads.flatten(), heads.numel(), hook.head_cost, hook.head_cost, wanted))
        assert torch.equal(hook.kept_units.flatten(), loop_fill(units.flatten(), 0, hook.unit_cost, hook.unit_cost,
                                                               hook.allowance - heads_spent))


def test_attention_share_ramps_each_kind_on_its_own_schedule() -> None:
    """Along the ramp the heads follow their own cubic from all heads to their share (the same heads as a fill over
    heads alone at that step's head target) and the units fill the rest of the step's overall target."""
    model = tiny_model()
    hook = structured(model, 0.6, steps=20, criterion="magnitude", attention_share=0.5, warmup_ratio=0.1,
                      cooldown_ratio=0.1)
    assert hook.head_allowance is not None and hook.head_allowance >= 2 * hook.head_cost  # some heads stay
    heads_along = []
    for step in range(1, 21):
        hook.on_optimizer_step(model, step)
        target = int(hook.schedule(step, float(hook.removable), float(hook.allowance)))
        if target >= hook.removable:
            continue
        head_target = int(hook.schedule(step, float(hook.all_heads_cost), float(hook.head_allowance)))
        heads, units = hook.importance()
        expected_heads = loop_fill(heads.flatten(), heads.numel(), hook.head_cost, hook.head_cost, head_target)
        assert torch.equal(hook.kept_heads.flatten(), expected_heads), step
        spent = int(expected_heads.sum()) * hook.head_cost
        assert torch.equal(hook.kept_units.flatten(),
                           loop_fill(units.flatten(), 0, hook.unit_cost, hook.unit_cost, target - spent)), step
        heads_along.append(int(hook.kept_heads.sum()))
    assert heads_along[0] > heads_along[-1] >= 1 and heads_along == sorted(heads_along, reverse=True)
    assert hook.final_report(model)["within_budget"]

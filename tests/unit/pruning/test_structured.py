"""The structured method's criteria and its greedy fill, against references written out by hand."""

from __future__ import annotations

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


def test_taylor_removes_a_dead_head_first_and_stays_within_budget() -> None:
    """A head whose output columns are zero changes nothing when removed: the Taylor criterion drops it first."""
    model = tiny_model()
    hook = structured(model, 0.9, steps=10, warmup_ratio=0.3, cooldown_ratio=0.1)
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
    importance: the same heads as a fill over heads alone, the same units as a fill over units alone."""
    for share in (0.0, 0.3, 1.0):
        model = tiny_model()
        hook = structured(model, 0.4, steps=10, criterion="magnitude", attention_share=share)
        hook.final_masks()
        assert hook.budget is not None
        heads_spent = int(hook.kept_heads.sum()) * hook.head_cost
        wanted = min(int(share * hook.allowance), hook.all_heads_cost)
        assert wanted - hook.head_cost < heads_spent <= wanted
        report = hook.final_report(model)
        assert report["within_budget"] and hook.budget.target - report["kept_blocks"] < hook.unit_cost
        heads, units = hook.importance()
        assert torch.equal(hook.kept_heads.flatten(),
                           loop_fill(heads.flatten(), heads.numel(), hook.head_cost, hook.head_cost, wanted))
        assert torch.equal(hook.kept_units.flatten(), loop_fill(units.flatten(), 0, hook.head_cost, hook.unit_cost,
                                                               hook.allowance - heads_spent))


def test_attention_share_ramps_each_kind_on_its_own_schedule() -> None:
    """Along the ramp the heads follow their own cubic from all heads to their share: never more than that."""
    model = tiny_model()
    hook = structured(model, 0.3, steps=20, criterion="magnitude", attention_share=0.2, warmup_ratio=0.1,
                      cooldown_ratio=0.1)
    for step in range(1, 21):
        hook.on_optimizer_step(model, step)
        assert hook.head_allowance is not None
        head_target = hook.schedule(step, float(hook.all_heads_cost), float(hook.head_allowance))
        assert int(hook.kept_heads.sum()) * hook.head_cost <= head_target + 1e-6
        kept = int(hook.kept_heads.sum()) * hook.head_cost + int(hook.kept_units.sum()) * hook.unit_cost
        assert kept <= hook.schedule(step, float(hook.removable), float(hook.allowance)) + 1e-6
    assert hook.final_report(model)["within_budget"]

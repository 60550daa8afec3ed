"""Rank pruning against references: the SVD factorisation, hard-concrete expected L0, the projection to the budget, the
Lagrangian and the gates' tracking of the target."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import mtp.pruning.rank as rank_module
from mtp.model import MultitaskModel, load_encoder
from mtp.pruning import (
    FactorizedLinear,
    RankPruning,
    accelerator_paths,
    build_pruning,
    prunable_modules,
    pruning_settings,
)
from mtp.zero3 import full_state_dict
from tests.unit.pruning.tiny import tiny_model


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
    Q must still get (zero) gradients, so that every data-parallel rank reduces the same tensors. (The layer's
    products no longer call F.linear: the patch stays so that a path back to it under ZeRO-3 is caught.)"""
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
    assert torch.equal(layer.factors.grad, torch.zeros_like(layer.factors))
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


def test_rank_pruning_projects_within_budget_and_counts_rank_cost() -> None:
    model = tiny_model("tiny-roberta")
    hook = build_pruning(pruning_settings(method="rank", budget=0.3), 10)[0]
    hook.setup(model)
    modules = [m for _, _, m in prunable_modules(model)]
    assert all(isinstance(m, FactorizedLinear) for m in modules)
    assert hook.start_density > 1.0  # a full-rank factorisation is larger than the dense matrices
    for m in modules:
        m.log_alpha.data.normal_()
    report = hook.final_report(model)
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


def rank_closed_loop(steps: int, budget: float = 0.3, **overrides: Any) -> tuple[RankPruning, nn.Module, float]:
    """Train a tiny model's gates as in training (task loss plus the Lagrangian, AdamW); returns the hook, the model
    and the largest |expected size - target| once the ramp is under way (after 30% of the steps). The Lagrangian
    alone unless `overrides` set a size limit (`lag_limit`; the method's defaults with `defaults=True`)."""
    torch.manual_seed(0)
    model = tiny_model().train()
    limit = {} if overrides.pop("defaults", False) or "lag_limit" in overrides else {"lag_limit": None}
    cfg = pruning_settings(method="rank", budget=budget, warmup_ratio=0.1, cooldown_ratio=0.2, **limit, **overrides)
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
    report = hook.final_report(model)
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
    report = hook.final_report(model)
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


class HostReads(TorchFunctionMode):
    """Counts the calls that read a value back to the host (a sync on an accelerator)."""

    NAMES = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


def test_the_accelerator_path_trains_the_same_gates_without_reading_them_back() -> None:
    """Rank's sync-free path (closed gates multiplied by 0, not left out; the size and the multipliers kept on the
    device; every layer's gates drawn at once, so other noise than the CPU path's) follows the CPU path's trajectory
    within that noise, and a training step on it reads nothing back to the host."""
    host, _, host_gap = rank_closed_loop(60)
    with accelerator_paths():
        device, model, device_gap = rank_closed_loop(60)
        assert isinstance(device.last_density, torch.Tensor) and isinstance(device.lambda1, torch.Tensor)
        assert float(device.last_density) == pytest.approx(host.last_density, abs=1e-3)
        assert float(device.lambda1) == pytest.approx(host.lambda1, rel=1e-3, abs=1e-6)
        assert device_gap == pytest.approx(host_gap, abs=1e-3)
        x = torch.randint(1, 1000, (8, 12))
        reads = HostReads()
        with reads:
            # no attention mask: transformers' own check of it (`padding_mask.all()`) is a read of the dense model
            loss = model("rte", input_ids=x, attention_mask=None, labels=(x[:, 0] % 2).long())["loss"]
            (loss + device.extra_loss(model, 30)).backward()
            device.on_optimizer_step(model, 30)
        assert reads.count == 0


def test_the_accelerator_path_leaves_out_the_projected_ranks_with_the_same_output() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5).eval()
    with torch.no_grad():
        layer.log_alpha[:5] = -10.0  # closed gates
        layer.keep[10:] = False  # ranks the projection dropped
    x = torch.randn(3, 24)
    expected = layer(x)
    with accelerator_paths():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
        assert layer.kept_index().tolist() == list(range(10))
        layer.keep[8:] = False  # a new keep mask (a checkpoint load): read again
        assert layer.kept_index().tolist() == list(range(8))


@pytest.mark.parametrize("budget", [0.05, 0.3])
def test_the_shift_control_holds_the_expected_size_on_the_target(budget: float) -> None:
    """size_control "shift": the expected size is on the cubic target after every step of the ramp and ends at B
    (where the Lagrangian at the default rates lags a 100-step run), so the projection removes little."""
    torch.manual_seed(0)
    model = tiny_model().train()
    steps = 100
    cfg = pruning_settings(method="rank", budget=budget, warmup_ratio=0.1, cooldown_ratio=0.2, size_control="shift")
    hook = build_pruning(cfg, steps)[0]
    hook.setup(model)
    groups = hook.param_groups(model)
    gates = {id(p) for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in gates], "lr": 1e-3},
                                   *groups])
    worst = 0.0
    for step in range(steps):
        x = torch.randint(1, 1000, (8, 12))
        loss = model("rte", input_ids=x, attention_mask=torch.ones_like(x), labels=(x[:, 0] % 2).long())["loss"]
        assert hook.extra_loss(model, step) is None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.on_optimizer_step(model, step + 1)
        if hook.modules[0].sample:
            worst = max(worst, abs(hook.last_density - hook.target(step + 1)) / hook.target(step + 1))
    end = hook.budget.target / hook.budget.dense_blocks
    with torch.no_grad():
        expected = float(hook.expected_density())
    assert abs(expected - end) / end < 0.02 and worst < 0.02, (expected, end, worst)
    report = hook.final_report(model)
    assert report["expected_over_target"] == pytest.approx(1.0, abs=0.02)
    assert report["within_budget"] and "gate_offset" in dict(model.named_buffers()).__repr__()


def test_the_gate_offset_is_in_the_saved_state_its_fold_and_its_compact_form() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5, offset=True)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-1.0, 4.0, 16))
        layer.gate_offset.fill_(-2.0)  # closes the ranks whose log alpha is below about 2
    layer.eval()
    state = {f"m.{k}": v for k, v in full_state_dict(layer).items()}  # the saved layout: P and Q apart
    assert state["m.P"].shape == (16, 16) and state["m.Q"].shape == (16, 24)
    settings = pruning_settings(method="rank", budget=0.5, size_control="shift")
    x = torch.randn(3, 24)
    folded = FactorizedLinear.fold(state, "m", settings)
    torch.testing.assert_close(x @ folded.T + layer.bias, layer(x), atol=1e-5, rtol=1e-5)
    compact = FactorizedLinear.compact(state, "m", settings)
    assert 0 < compact["m.Q"].shape[0] < 16  # the offset closed some ranks, the rest kept


def test_the_gate_arithmetic_with_constants_gives_the_python_numbers_bits() -> None:
    """The float32 constants that replace Python numbers in the gate arithmetic change no bit of the gates."""
    torch.manual_seed(0)
    log_alpha = torch.cat([torch.randn(4096) * 4, torch.tensor([-50.0, 50.0, 0.0, -1.6, 2.5])])
    by_python_numbers = (torch.sigmoid(log_alpha) * (1.1 - -0.1) + -0.1).clamp(0.0, 1.0)
    assert torch.equal(rank_module.deterministic_gates(log_alpha, -0.1, 1.1), by_python_numbers)


def test_a_float32_gate_forward_and_backward_casts_nothing() -> None:
    """In float32 the gates' arithmetic makes no copy to convert a number (each would be host work per matrix and
    step on an accelerator): sampled along the ramp and deterministic after the projection."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5).train()
    x = torch.randn(3, 5, 24)
    with accelerator_paths():
        for projected in (False, True):
            layer.sample = not projected
            if projected:
                layer.keep[8:] = False
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = layer(x).sum()
                (out + layer.aux if layer.sample else out).backward()
            copies = [e.name for e in prof.events() if e.name == "aten::_to_copy"]
            assert not copies, (projected, len(copies))


def test_the_batched_gates_of_an_accelerator_track_the_target_as_the_layers_own() -> None:
    """On an accelerator the hook computes every layer's gates at once (one noise draw per forward pass): the same
    closed loop tracks the target and ends at the budget as with the per-layer gates."""
    with accelerator_paths():
        hook, model, worst_gap = rank_closed_loop(400)
        assert all(m.given_gates is not None for m in hook.modules)  # the last training pass's gates
        assert hook.batched_density is not None
        model.eval()
        model("rte", input_ids=torch.randint(1, 1000, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
        assert all(m.given_gates is None for m in hook.modules)  # evaluation clears them
    end = hook.budget.target / hook.budget.dense_blocks
    assert abs(hook.last_density - end) < 0.01 and worst_gap < 0.05, (hook.last_density, end, worst_gap)
    report = hook.final_report(model)
    assert report["within_budget"] and hook.budget.target - report["kept_blocks"] < max(m.rank_cost
                                                                                       for m in hook.modules)


@pytest.mark.parametrize("projected", [False, True])
def test_the_batched_gates_give_each_layer_its_own_gates_size_and_gradients(projected: bool) -> None:
    """Deterministic gates (the fixed-rank phase, with and without projected ranks) through the batched path give the
    per-layer path's output and gradients; along the ramp, gates whose log alpha is far from 0 are the same 0 or 1
    sampled either way, and the expected size is the per-layer sum."""
    torch.manual_seed(0)
    model = tiny_model().train()
    hook = build_pruning(pruning_settings(method="rank", budget=0.3), 10)[0]
    hook.setup(model)
    with torch.no_grad():
        for m in hook.modules:
            m.log_alpha.copy_(torch.randn_like(m.log_alpha) * 3)
    if projected:
        hook.project()
    x = torch.randint(1, 1000, (4, 9))

    def run(accelerator: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout on both paths
        with accelerator_paths() if accelerator else contextlib.nullcontext():
            out = model("rte", input_ids=x, attention_mask=torch.ones_like(x))["logits"]
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for m in hook.modules:
        m.sample = False
    per_layer, batched = run(False), run(True)
    torch.testing.assert_close(batched[0], per_layer[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(batched[1], per_layer[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if projected:
        return
    with torch.no_grad():  # saturated gates: a sample is 0 or 1 whatever the noise
        for m in hook.modules:
            m.log_alpha.copy_(torch.where(m.log_alpha > 0, 60.0, -60.0))
            m.sample = True
    with accelerator_paths():
        hook.gates_for_all_layers(model, ())
        given = [m.given_gates.clone() for m in hook.modules]
        density = float(hook.batched_density.detach())
    for m, g in zip(hook.modules, given, strict=True):
        m.given_gates = None
        assert torch.equal(g, m.gates())
    with torch.no_grad():
        per_layer_density = float(hook.expected_density())
    assert density == pytest.approx(per_layer_density, rel=1e-6)


def test_the_lag_limit_holds_a_lagging_run_at_its_limit_and_leaves_a_tracking_one_alone() -> None:
    """A run a quarter as long lags the target at the default rates (ends more than 0.05 above B); with
    `lag_limit=1.05` its expected size ends within 5% of B, so the projection cuts little. A limit that is never
    reached changes no bit of the run."""
    lagging, _, _ = rank_closed_loop(100)
    end = lagging.budget.target / lagging.budget.dense_blocks
    assert lagging.last_density - end > 0.05
    limited, model, _ = rank_closed_loop(100, lag_limit=1.05, lag_response="shift")
    with torch.no_grad():
        expected = float(limited.expected_density())
    assert expected <= end * 1.05 + 1e-4, (expected, end)
    assert limited.final_report(model)["expected_over_target"] <= 1.05 + 1e-4
    assert any(float(m.gate_offset) < 0 for m in limited.modules)  # the limit acted
    free, free_model, _ = rank_closed_loop(100, lag_limit=100.0, lag_response="shift")
    assert all(float(m.gate_offset) == 0.0 for m in free.modules)
    for a, b in zip(free.modules, lagging.modules, strict=True):
        assert torch.equal(a.log_alpha, b.log_alpha)
    # what the run records is the same too: the size, the multipliers, the reported metrics
    assert free.state_dict() == lagging.state_dict() and free.metrics() == lagging.metrics()
    with pytest.raises(ValueError, match="lag_limit"):
        pruning_settings(method="rank", budget=0.3, size_control="shift", lag_limit=1.05)


def test_the_closing_lag_limit_closes_the_lowest_ranks_and_leaves_the_others_as_they_are() -> None:
    """With `lag_response: close` a lagging run ends within its limit by closing ranks, lowest log alpha first: no
    gate is moved (no offset), every closed rank had a log alpha at or under every open one's when it closed, the
    projection keeps only open ranks, and the final size is within B."""
    lagging, _, _ = rank_closed_loop(100)
    closing, model, _ = rank_closed_loop(100, lag_limit=1.05, lag_response="close")
    end = closing.budget.target / closing.budget.dense_blocks
    with torch.no_grad():
        expected = float(closing.expected_density())
    assert expected <= end * 1.05 + 1e-4 < lagging.last_density, (expected, end, lagging.last_density)
    assert all(m.gate_offset is None for m in closing.modules)
    closed_on_the_ramp = [~m.keep.clone() for m in closing.modules]
    assert any(bool(c.any()) for c in closed_on_the_ramp)
    assert closing.final_report(model)["within_budget"]
    assert not any(bool((c & m.keep).any()) for c, m in zip(closed_on_the_ramp, closing.modules, strict=True))
    with pytest.raises(ValueError, match="lag_response"):
        pruning_settings(method="rank", budget=0.3, lag_limit=None, lag_response="close")


def test_closing_to_an_expected_size_closes_exactly_the_lowest_ranks_it_needs() -> None:
    """`close_to_expected` on set log alphas: the ranks closed are the lowest ones, and just enough of them (the
    size before the last one closed was over the target, the size after it is not)."""
    torch.manual_seed(0)
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="rank", budget=0.3, lag_limit=1.1, lag_response="close"), 10)[0]
    hook.setup(model)
    with torch.no_grad():
        for m in hook.modules:
            m.log_alpha.copy_(torch.randn_like(m.log_alpha) * 3)
        before = float(hook.expected_density())
        hook.close_to_expected(0.6 * before)
        after = float(hook.expected_density())
    closed = torch.cat([m.log_alpha.detach()[~m.keep] for m in hook.modules])
    still = torch.cat([m.log_alpha.detach()[m.keep] for m in hook.modules])
    assert closed.numel() > 0 and closed.max() <= still.min()
    assert after <= 0.6 * before
    last_closed = max(((m, int(j)) for m in hook.modules for j in torch.nonzero(~m.keep).flatten()),
                      key=lambda mj: float(mj[0].log_alpha[mj[1]].detach()))
    with torch.no_grad():  # reopening the last one closed puts the size back over the target
        last_closed[0].keep[last_closed[1]] = True
        assert float(hook.expected_density()) > 0.6 * before


def test_closing_by_energy_closes_the_weakest_share_of_each_matrix_first() -> None:
    """`close_order: energy` ranks the kept ranks by their share of their matrix's energy (|P_r| |Q_r| g_r)^2: every
    rank closed had a share at or under every open one's, and the log alphas play no part in the order."""
    torch.manual_seed(0)
    model = tiny_model()
    hook = build_pruning(pruning_settings(method="rank", budget=0.3, lag_limit=1.1, lag_response="close",
                                          close_order="energy"), 10)[0]
    weights = [m.weight.detach().clone() for _, _, m in prunable_modules(model)]
    hook.setup(model)
    singular = [torch.linalg.svdvals(w.double()) for w in weights]  # at the start: s_r^2 over the matrix's sum
    expected = torch.cat([s ** 2 / (s ** 2).sum() for s in singular])
    assert torch.allclose(hook.energy_shares(), expected, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        for m in hook.modules:
            m.log_alpha.copy_(torch.linspace(6.0, 3.0, m.log_alpha.numel()))  # every gate 1, the last ranks lowest
            m.P.mul_(torch.rand(m.P.shape[1]))
        shares = hook.energy_shares()
        before = float(hook.expected_density())
        hook.close_to_expected(0.6 * before)
        assert float(hook.expected_density()) <= 0.6 * before
    keep = torch.cat([m.keep for m in hook.modules])
    assert (~keep).any() and shares[~keep].max() <= shares[keep].min()
    by_alpha = torch.cat([m.log_alpha.detach() for m in hook.modules])
    assert by_alpha[~keep].max() > by_alpha[keep].min()  # not the log-alpha order
    after = hook.energy_shares()  # a closed rank has no share; each matrix's open ranks share it all again
    assert (after[~keep] == 0).all()
    for part, m in zip(after.split([m.keep.numel() for m in hook.modules]), hook.modules, strict=True):
        if m.keep.any():
            assert float(part.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="close_order"):
        pruning_settings(method="rank", budget=0.3, lag_response="shift", close_order="energy")


def test_closing_from_half_way_follows_a_line_from_the_lagging_size_to_the_limit() -> None:
    """`close_from: 0.5`: no limit before half the ramp; from there a straight line from the size the Lagrangian
    left to `lag_limit` times the final target at the ramp's end (never under the limit on the schedule), kept
    through a checkpoint; a closed loop that lags ends within its limit."""
    hook = build_pruning(pruning_settings(method="rank", budget=0.3, warmup_ratio=0.1, cooldown_ratio=0.2,
                                          lag_limit=1.05, lag_response="close", close_from=0.5), 100)[0]
    hook.setup(tiny_model())
    ramp_end = hook.schedule_end - hook.cooldown  # 80; the ramp starts at 10, so closing starts at 45
    final = hook.target(ramp_end) * 1.05
    assert hook.closing_limit(44) is None and hook.close_start is None
    hook.last_density = 0.9
    assert hook.closing_limit(45) == pytest.approx(max(0.9, hook.target(45) * 1.05))
    assert hook.close_start == (45, 0.9)
    middle = hook.closing_limit(62)
    assert max(final, hook.target(62) * 1.05) <= middle < 0.9
    assert middle == pytest.approx(max(hook.target(62) * 1.05, 0.9 + (final - 0.9) * 17 / 35))
    assert hook.closing_limit(ramp_end) == pytest.approx(final)
    restored = build_pruning(hook.cfg, 100)[0]
    restored.setup(tiny_model())
    restored.load_state_dict(hook.state_dict())
    assert restored.close_start == hook.close_start and restored.closing_limit(62) == hook.closing_limit(62)
    lagging, _, _ = rank_closed_loop(100)
    closing, model, _ = rank_closed_loop(100, lag_limit=1.05, lag_response="close", close_from=0.5)
    end = closing.budget.target / closing.budget.dense_blocks
    with torch.no_grad():
        expected = float(closing.expected_density())
    assert expected <= end * 1.05 + 1e-4 < lagging.last_density
    assert closing.close_start is not None and closing.close_start[0] == 45  # the first ramp step from half-way
    assert closing.final_report(model)["within_budget"]
    with pytest.raises(ValueError, match="close_from"):
        pruning_settings(method="rank", budget=0.3, lag_response="shift", close_from=0.5)


def test_by_default_a_small_target_is_reached_by_training_not_by_the_cut() -> None:
    """Rank's defaults (the Lagrangian, then closing the lagging ranks from half the ramp to 1.05 times the target):
    a tiny run at a small size ends its ramp within 5% of the target, where the Lagrangian alone lags it by far
    (the final projection would then cut the rest at once); the size limits' defaults step aside where they mean
    nothing."""
    settings = pruning_settings(method="rank", budget=0.1)
    assert (settings.lag_limit, settings.lag_response, settings.close_from) == (1.05, "close", 0.5)
    alone, _, _ = rank_closed_loop(100, budget=0.1)
    default, model, _ = rank_closed_loop(100, budget=0.1, defaults=True)
    end = default.budget.target / default.budget.dense_blocks
    with torch.no_grad():
        expected = float(default.expected_density())
    assert expected <= end * 1.05 + 1e-4 and alone.last_density > end * 1.5, (expected, alone.last_density, end)
    report = default.final_report(model)
    assert report["within_budget"] and report["expected_over_target"] <= 1.05 + 1e-3
    shift = pruning_settings(method="rank", budget=0.1, size_control="shift")
    assert (shift.lag_limit, shift.lag_response, shift.close_from) == (None, "shift", None)
    assert pruning_settings(method="rank", budget=0.1, lag_response="shift").close_from is None


@pytest.mark.parametrize("selected", [False, True])
@pytest.mark.parametrize("batch_shape", [(7,), (3, 5)])
def test_the_low_rank_product_gives_autograds_bits(selected: bool, batch_shape: tuple[int, ...]) -> None:
    """The fused product (P and Q in one parameter, one gradient for both) against F.linear(F.linear(x, Q) * g, P, b)
    under autograd, on P and Q as separate leaves: the same output and gradients, bit for bit, in float32."""
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5)
    x = torch.randn(*batch_shape, 24, requires_grad=True)
    gates = torch.rand(16, requires_grad=True)
    index = torch.tensor([0, 3, 4, 9, 15]) if selected else None
    p_ref = layer.P.detach().clone().requires_grad_()
    q_ref = layer.Q.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    gates_ref = gates.detach().clone().requires_grad_()
    g = gates if index is None else gates.index_select(0, index)
    g_ref = gates_ref if index is None else gates_ref.index_select(0, index)
    p_use, q_use = (p_ref, q_ref) if index is None else (p_ref.index_select(1, index), q_ref.index_select(0, index))
    expected = F.linear(F.linear(x_ref, q_use) * g_ref, p_use, bias_ref)
    out = layer._product(x, g, index)
    assert torch.equal(out, expected)
    upstream = torch.randn_like(out)
    expected.backward(upstream)
    out.backward(upstream)
    assert torch.equal(layer.factors.grad[:16], p_ref.grad)
    assert torch.equal(layer.factors.grad[16:].view(16, 24), q_ref.grad)
    for mine, reference in ((x.grad, x_ref.grad), (gates.grad, gates_ref.grad), (layer.bias.grad, bias_ref.grad)):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("selected", [False, True])
def test_the_low_rank_product_under_autocast_computes_as_autocast_runs_the_linears(selected: bool) -> None:
    """Under torch.autocast (bf16 on the CPU) the fused product runs its products in bf16 as autocast runs F.linear,
    its backward pass too, and each gradient comes back in its input's dtype (float32), close to autograd's."""
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(24, 16), beta=2 / 3, stretch=(-0.1, 1.1), log_alpha_init=2.5)
    x = torch.randn(3, 5, 24, requires_grad=True)
    gates = torch.rand(16, requires_grad=True)
    index = torch.tensor([0, 3, 4, 9, 15]) if selected else None
    refs = [t.detach().clone().requires_grad_() for t in (layer.P, layer.Q, layer.bias, x, gates)]
    p_ref, q_ref, bias_ref, x_ref, gates_ref = refs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gates if index is None else gates.index_select(0, index)
        g_ref = gates_ref if index is None else gates_ref.index_select(0, index)
        p_use, q_use = (p_ref, q_ref) if index is None else (p_ref.index_select(1, index), q_ref.index_select(0, index))
        expected = F.linear(F.linear(x_ref, q_use) * g_ref, p_use, bias_ref)
        out = layer._product(x, g, index)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    expected.backward(upstream)
    out.backward(upstream)
    grads = {"P": layer.factors.grad[:16], "Q": layer.factors.grad[16:].view(16, 24), "bias": layer.bias.grad,
             "x": x.grad, "gates": gates.grad}
    for (name, mine), reference in zip(grads.items(), (p_ref.grad, q_ref.grad, bias_ref.grad, x_ref.grad,
                                                       gates_ref.grad), strict=True):
        assert mine.dtype == torch.float32, name
        torch.testing.assert_close(mine, reference, atol=5e-2, rtol=2e-2, msg=name)

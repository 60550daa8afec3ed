"""DeepSpeed's ZeRO-1/2 step with the foreach gradient norm and without re-pointing parameters that already are their
flat slice: the same norms and the same weights, bit for bit, with fewer operators."""

from __future__ import annotations

import collections

import pytest
import torch

from mtp.training import zero_step
from mtp.training.distributed import init_distributed


def _train(stage: int, lean: bool, bf16: bool, contiguous: bool = False,
           ) -> tuple[list[float], list[torch.Tensor], collections.Counter]:
    import deepspeed
    from torch.profiler import ProfilerActivity, profile

    (zero_step.install if lean else zero_step.uninstall)()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.05,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "contiguous_gradients": contiguous}, "steps_per_print": 10**9}
    if bf16:
        config["bf16"] = {"enabled": True, "check_grad_overflow": False}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    generator = torch.Generator().manual_seed(1)
    norms = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)
            out = engine(x.to(next(model.parameters()).dtype))
            engine.backward(torch.nn.functional.mse_loss(out.float(), y))
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
    zero_step.uninstall()
    return norms, [p.detach().clone() for p in model.parameters()], collections.Counter(e.name for e in prof.events())


@pytest.mark.parametrize(("stage", "bf16"), [(1, False), (2, False), (2, True)])
def test_the_lean_zero_step_trains_bit_for_bit_with_fewer_operators(stage: int, bf16: bool) -> None:
    init_distributed()
    lean_norms, lean_weights, lean_ops = _train(stage, lean=True, bf16=bf16)
    norms, weights, ops = _train(stage, lean=False, bf16=bf16)
    assert lean_norms == norms and all(n > 0.05 for n in norms)  # clipping at work on every step
    for a, b in zip(lean_weights, weights, strict=True):
        assert torch.equal(a, b)
    # DeepSpeed copies each gradient to float64 for its norm and re-points each parameter after every step
    assert lean_ops["aten::_has_compatible_shallow_copy_type"] < ops["aten::_has_compatible_shallow_copy_type"]
    assert sum(lean_ops.values()) < sum(ops.values())


def test_an_unexpected_deepspeed_keeps_its_own_methods(monkeypatch) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero_step.uninstall()
    original = DeepSpeedZeroOptimizer.get_grad_norm_direct
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "_update_model_bit16_weights", lambda self, group: None)
    assert not zero_step.install()
    assert DeepSpeedZeroOptimizer.get_grad_norm_direct is original


@pytest.mark.parametrize("norm", [0.5, 3.0, float("nan"), float("inf"), -1.0])  # -1: DeepSpeed's invalid sentinel
def test_the_clip_factor_is_deepspeeds_for_every_norm_without_a_host_read(norm: float) -> None:
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero_step.uninstall()
    optimizer = SimpleNamespace(clip_grad=1.0, loss_scale=1.0, device="cpu")
    grads = [torch.linspace(-1, 1, 7), torch.ones(3)]
    theirs = [g.clone() for g in grads]
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(optimizer, [theirs], torch.tensor(norm))
    assert zero_step.install()
    ours = [g.clone() for g in grads]
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(optimizer, [ours], torch.tensor(norm))
    zero_step.uninstall()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bf16", [False, True])
def test_one_rank_trains_the_same_without_the_contiguous_gradient_buffer(bf16: bool) -> None:
    """What `contiguous_gradients: "auto"` picks at one rank (optim.build_ds_config) changes no value."""
    init_distributed()
    norms, weights, ops = _train(2, lean=True, bf16=bf16, contiguous=False)
    contiguous_norms, contiguous_weights, contiguous_ops = _train(2, lean=True, bf16=bf16, contiguous=True)
    assert norms == contiguous_norms
    for a, b in zip(weights, contiguous_weights, strict=True):
        assert torch.equal(a, b)
    assert sum(ops.values()) < sum(contiguous_ops.values())

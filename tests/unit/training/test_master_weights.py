"""ZeRO's fp32 master partition made one tensor with the parameters' own partition (fp32 runs), and ZeRO-3's
gradient partition held only from backward to step: the memory is held once or freed, and training is bit for bit
what it is with DeepSpeed's own buffers."""

from __future__ import annotations

import pytest
import torch

from mtp.training.distributed import init_distributed
from mtp.training.optim import release_gradients_between_steps, share_master_weights
from mtp.zero3 import gathered


def _train(stage: int, share: bool, release: bool = False, accum: int = 1) -> tuple[int, list[torch.Tensor]]:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": accum, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    shared = share_master_weights(engine) if share else 0
    if share:
        assert share_master_weights(engine) == 0  # already one tensor
    if release:
        assert release_gradients_between_steps(engine) == (stage == 3)
        assert engine.optimizer.grad_partitions_flat_buffer is None
    generator = torch.Generator().manual_seed(1)
    for micro in range(4 * accum):
        x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        if release:  # written by the backward pass, kept through the micro-batches of a step
            assert engine.optimizer.grad_partitions_flat_buffer is not None
        engine.step()
        if release:
            assert (engine.optimizer.grad_partitions_flat_buffer is None) == ((micro + 1) % accum == 0)
    weights = []
    for p in model.parameters():
        with gathered([p]):
            weights.append(p.detach().clone())
    return shared, weights


@pytest.mark.parametrize("stage", [2, 3])  # stage 1 takes the stage-2 code path
def test_the_shared_master_holds_the_weights_once_and_trains_the_same(stage: int) -> None:
    init_distributed()
    shared, weights = _train(stage, share=True)
    _, separate = _train(stage, share=False)
    assert shared == 16 * 32 + 32 + 32 * 4 + 4  # every element, held once
    for name, a, b in zip(("0.weight", "0.bias", "2.weight", "2.bias"), weights, separate, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_2_free_the_cloned_master_and_keep_deepspeeds_fp32_views(stage: int) -> None:
    """DeepSpeed maps every parameter to its slice of the master (`_hp_mapping`); slices of the old clone kept its
    memory alive, and the fp32 API (`safe_get_full_fp32_param`, the optimizer states) must see the shared tensor."""
    import gc

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mtp.training.memory import live_tensors

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 4))  # 4 MiB of weights
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gc.collect()
    before = live_tensors()["tensors_mib"]
    shared = share_master_weights(engine)
    gc.collect()
    # the clone's 4 MiB, give or take what earlier tests left for the collector (a tenth of a MiB)
    assert before - live_tensors()["tensors_mib"] == pytest.approx(shared * 4 / 2**20, abs=0.25)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1024, generator=generator), torch.randn(8, 4, generator=generator)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    for p in model.parameters():
        assert torch.equal(safe_get_full_fp32_param(p), p.detach())
        assert float(safe_get_full_optimizer_state(p, "exp_avg_sq").abs().sum()) > 0.0


@pytest.mark.parametrize("accum", [1, 2])
def test_zero3_gradients_freed_between_steps_train_the_same(accum: int) -> None:
    init_distributed()
    _, released = _train(3, share=True, release=True, accum=accum)
    _, kept = _train(3, share=True, accum=accum)
    for name, a, b in zip(("0.weight", "0.bias", "2.weight", "2.bias"), released, kept, strict=True):
        assert torch.equal(a, b), name


def test_lazily_zeroed_buffers_are_zero_and_take_memory_only_where_written() -> None:
    import psutil

    from mtp.training.optim import lazily_zeroed

    process = psutil.Process()
    before = process.memory_info().rss
    buffer = lazily_zeroed(64 << 20, torch.float32, torch.device("cpu"))  # 256 MiB
    assert process.memory_info().rss - before < 32 << 20
    buffer[: 16 << 20].fill_(1.0)  # a quarter written: about 64 MiB mapped
    assert process.memory_info().rss - before < 128 << 20
    assert float(buffer[16 << 20:].abs().sum()) == 0.0 and float(buffer.sum()) == 16 << 20

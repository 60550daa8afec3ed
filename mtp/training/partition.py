"""ZeRO-3 from the start: under stage 3 the encoder is built partitioned (transformers' DeepSpeed integration runs
`from_pretrained` / `from_config` inside `deepspeed.zero.Init`, pretrained weights loaded one tensor at a time), the
layers the pruning hooks swap in are made inside `deepspeed.zero.Init` too (their new parameters are partitioned as
they are created), and weights copied in from a finished run go one tensor at a time. No rank holds the whole model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


@contextmanager
def hf_zero3_build(ds_config: dict[str, Any], enabled: bool) -> Iterator[None]:
    """Inside: transformers builds and loads models partitioned (stage 3 only), without touching the global RNG.
    Outside again, it builds plain modules (teachers, exports). Pretrained weights load exactly as under stages
    0-2; random weights (`encoder.random_init`) are other draws than under stages 0-2 (transformers initialises the
    partitioned modules one by one)."""
    if not enabled:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: alive only while this one is
    try:
        # a partitioned build draws random numbers where a plain load of pretrained weights draws none: the heads,
        # built next, then start as under stages 0-2
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def zero3_init(ds_config: dict[str, Any], enabled: bool) -> Any:
    """`deepspeed.zero.Init` for stage 3 (modules built inside get partitioned parameters), else nothing."""
    if not enabled:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def load_state_partitioned(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True)` for a model whose parameters may be ZeRO-3 partitions: each is
    gathered alone, rank 0's copy is written, and DeepSpeed scatters it back."""
    import deepspeed
    import torch.distributed as dist

    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    expected = set(model.state_dict())
    if set(state) != expected:
        raise KeyError(f"state and model differ: {sorted(set(state) ^ expected)[:3]}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, value in state.items():
            if name in params and hasattr(params[name], "ds_id"):
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                    if rank == 0:
                        params[name].data.copy_(value.to(params[name].dtype))
            else:
                (params.get(name) if name in params else buffers[name]).data.copy_(value)

"""ZeRO-3 parameters, read and written without any rank holding the whole model: the build contexts (under stage 3
the encoder is built partitioned: transformers' DeepSpeed integration runs `from_pretrained` / `from_config` inside
`deepspeed.zero.Init`, pretrained weights loaded one tensor at a time; the layers the pruning hooks swap in are made
inside `deepspeed.zero.Init` too), gathering for reading, and whole states saved or loaded one tensor at a time.
Every helper is a no-op for ordinary parameters, so the layers above call them under every stage."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether `param` is a ZeRO-3 partition (its data lives spread over the ranks)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter (a ZeRO-3 partition's local tensor is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """The element count of the whole parameter."""
    return int(getattr(param, "ds_numel", param.numel()))


def gathered(params: list[nn.Parameter]) -> Any:
    """Gather ZeRO-3 partitioned parameters for reading; a no-op for ordinary parameters."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


SavedPart = tuple[str, tuple[int, ...], int | None]
"""A saved tensor of one parameter: its name in the file, its shape, and its offset in the parameter's flattened
values (None: the parameter itself)."""


def saved_parts(model: nn.Module) -> list[tuple[nn.Parameter, list[SavedPart]]]:
    """Every parameter with the tensors it is saved as: itself, or, where one parameter holds several tensors (its
    module's `saved_parts(name)` gives their names under the module, offsets and shapes), each of them apart, so that
    saved files keep one layout whatever the training-time storage."""
    modules = dict(model.named_modules())
    out = []
    for name, param in model.named_parameters():
        owner, _, local = name.rpartition(".")
        split = getattr(modules.get(owner), "saved_parts", None)
        parts = split(local) if split is not None else None
        if parts is None:
            out.append((param, [(name, full_shape(param), None)]))
        else:
            out.append((param, [(f"{owner}.{suffix}" if owner else suffix, tuple(shape), offset)
                                for suffix, offset, shape in parts]))
    return out


def _part(tensor: torch.Tensor, shape: tuple[int, ...], offset: int | None) -> torch.Tensor:
    """The saved tensor `(shape, offset)` of a whole (gathered) parameter."""
    if offset is None:
        return tensor
    return tensor.reshape(-1).narrow(0, offset, math.prod(shape)).view(shape)


def save_full_state(model: nn.Module, path: Path, write: bool = True) -> None:
    """The whole state (parameters, persistent buffers) into one safetensors file, written tensor by tensor.

    Under ZeRO-3 each parameter is gathered, written and released in turn, so that no rank ever holds the whole
    model; every rank must call this (the gathers are collective) and only the one with `write` writes. The file
    is what `safetensors.torch.save_file(full_state_dict(model), path)` writes, up to the order of the tensors."""
    persistent = set(model.state_dict().keys())
    params = saved_parts(model)
    buffers = [(name, b) for name, b in model.named_buffers() if name in persistent]
    header: dict[str, Any] = {}
    offset = 0
    entries = [(name, shape, p.element_size(), p.dtype) for p, parts in params for name, shape, _ in parts]
    entries += [(name, tuple(b.shape), b.element_size(), b.dtype) for name, b in buffers]
    for name, shape, element_size, dtype in entries:
        size = math.prod(shape) * element_size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")

    def raw(tensor: torch.Tensor) -> bytes:
        return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    with open(partial, "wb") if write else nullcontext() as out:
        if out is not None:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
        for param, parts in params:
            with gathered([param]):
                if out is not None:
                    for _, shape, part_offset in parts:
                        out.write(raw(_part(param, shape, part_offset)))
        for _, buffer in buffers:
            if out is not None:
                out.write(raw(buffer))
    if write:
        partial.replace(path)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state (parameters gathered one by one under ZeRO-3, persistent buffers) as CPU tensors, in the
    saved layout (`saved_parts`)."""
    persistent = set(model.state_dict().keys())
    state = {}
    for param, parts in saved_parts(model):
        with gathered([param]):
            for name, shape, offset in parts:
                state[name] = _part(param.detach(), shape, offset).cpu().clone()
    for name, buf in model.named_buffers():
        if name in persistent:
            state[name] = buf.detach().cpu().clone()
    return state


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
                # copy_ itself (not .data.copy_): a buffer's version moves, so caches keyed by it see the load
                (params.get(name) if name in params else buffers[name]).copy_(value)

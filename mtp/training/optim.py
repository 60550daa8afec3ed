"""The DeepSpeed side of a run: its JSON config reconciled with the YAML, the optimizer groups and the schedule."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.distributed as dist

from mtp.config import ConfigError, ExperimentConfig, resolve_path
from mtp.hooks import Hook


def build_ds_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """Read the DeepSpeed JSON named by train.deepspeed_config and fill its "auto" values from the YAML.

    Batch size, accumulation, clipping, learning rate and weight decay come from the YAML (one source
    of truth); a concrete value in the JSON that disagrees is an error. The LR schedule is mtp's own
    (warmup + linear decay, per parameter group), so a "scheduler" block is refused.
    """
    path = resolve_path(cfg.train.deepspeed_config, "train.deepspeed_config")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: 'scheduler' is set by mtp from train.warmup_ratio; remove it")
    t = cfg.train
    wanted = {
        ("train_micro_batch_size_per_gpu",): t.micro_batch_size,
        ("gradient_accumulation_steps",): t.grad_accum,
        ("train_batch_size",): t.micro_batch_size * t.grad_accum * world_size,
        ("gradient_clipping",): t.grad_clip,
    }
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {})
        wanted[("optimizer", "params", "lr")] = t.lr
        wanted[("optimizer", "params", "weight_decay")] = t.weight_decay
    for keys, value in wanted.items():
        node = ds
        for key in keys[:-1]:
            node = node[key]
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            yaml_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                        "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.grad_clip",
                        "lr": "train.lr", "weight_decay": "train.weight_decay",
                        "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks"}[keys[-1]]
            raise ConfigError(f"{path}: {'.'.join(keys)}={current} disagrees with {yaml_key}={value}; "
                              "set it to \"auto\"")
        node[keys[-1]] = value
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") in (1, 2):
        # at one rank there is nothing to reduce: a contiguous gradient buffer only adds a copy of every gradient
        # into it (and per-parameter views); overlapping communication pays only with ranks to talk to
        if zero.get("contiguous_gradients") == "auto":
            zero["contiguous_gradients"] = world_size > 1
        if zero.get("overlap_comm") == "auto":
            from deepspeed.accelerator import get_accelerator

            zero["overlap_comm"] = world_size > 1 and get_accelerator().device_name() != "cpu"
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    bf16 = ds.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled"):
        # bf16 has fp32's range and no loss scale to adjust: DeepSpeed's overflow check (on by default) only adds
        # per-step reductions and a host sync; a non-finite loss still stops the run at its next log step
        bf16.setdefault("check_grad_overflow", False)
    return ds


def precision_of(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def torch_dtype(ds: dict[str, Any]) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_of(ds)]


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def total_steps(cfg: ExperimentConfig, sizes: dict[str, int], world: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    return max(1, math.ceil(cfg.train.epochs * sum(sizes.values()) / per_step))


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _constant(_step: int) -> float:
    return 1.0


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then linear decay for every group, except groups marked `constant_lr` (gates: FLOP and CoFi train
    them at a constant rate)."""
    decay = lr_lambda(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_constant if g.get("constant_lr") else decay for g in optimizer.param_groups])


def split_param_groups(model: torch.nn.Module, hooks: list[Hook], weight_decay: float) -> list[dict[str, Any]]:
    """Default AdamW groups (no decay on biases and LayerNorms) plus the hooks' own groups."""
    hook_groups = [g for h in hooks for g in h.param_groups(model)]
    taken = {id(p) for g in hook_groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its full shape counts
        (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups + hook_groups if g["params"]]


def skip_single_rank_reduction(engine: Any) -> None:
    """On one rank without ZeRO there is nothing to reduce, yet DeepSpeed's stage-0 path still flattens and
    copies back every gradient after each backward pass (about 7% of a MiniLM step on CPU): switch it off."""
    if engine.zero_optimization_stage() == 0 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False


def zero3_layers_as_leaves(model: torch.nn.Module, ds: dict[str, Any]) -> int:
    """Under ZeRO-3, each encoder layer a ZeRO-3 leaf module: DeepSpeed fetches and releases a layer's parameters
    together and hooks the layer alone, not each of its submodules (per-module hooks are most of ZeRO-3's extra
    host work at one rank). The same operators on the same values; a run agrees with one without leaves to float32
    rounding, not bit for bit (docs/gpu.md). A config that chooses leaves itself (`leaf_module`, or
    `stage3_module_granularity_threshold`, which also changes how DeepSpeed frees a leaf's parameters) is left to
    DeepSpeed. Returns how many layers were marked."""
    zero = ds.get("zero_optimization", {})
    if zero_stage(ds) != 3 or "leaf_module" in zero or zero.get("stage3_module_granularity_threshold", 0):
        return 0
    from deepspeed.utils import set_z3_leaf_module

    from mtp.model import encoder_layers

    layers = encoder_layers(model)
    for layer in layers:
        set_z3_leaf_module(layer, True)
    return len(layers)


def share_master_weights(engine: Any) -> int:
    """When the model trains in fp32, ZeRO's fp32 master partition is a second copy of the parameters' own
    partition: make the two one tensor. Stages 1-2 always clone it; stage 3 means to share it but compares a
    torch.device with the accelerator's device string, which never holds, so it clones too (DeepSpeed 0.19).
    The optimizer steps the master in place and then copies it onto the parameters: with one tensor that copy
    is a no-op. Returns the elements no longer held twice (0 with bf16/fp16, whose master copy is needed)."""
    optimizer = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() == 3:
        pairs = list(zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat, strict=True))
    elif engine.zero_optimization_stage() in (1, 2):
        pairs = [(partitions[dist.get_rank(group=optimizer.real_dp_process_group[i])], master)
                 for i, (partitions, master) in enumerate(zip(optimizer.parallel_partitioned_bit16_groups,
                                                              optimizer.single_partition_of_fp32_groups, strict=True))]
    else:
        return 0
    shared = 0
    for own, master in pairs:
        if (own is None or own.data_ptr() == master.data_ptr() or own.dtype != master.dtype
                or own.device != master.device or own.shape != master.shape):
            continue
        master.data = own.data
        shared += own.numel()
    if shared and engine.zero_optimization_stage() in (1, 2):
        # Stages 1-2 map every parameter to its slice of the master (`_hp_mapping`, DeepSpeed's API for full fp32
        # parameters and universal checkpoints): slices of the old clone, which kept it alive. Map them again, as
        # DeepSpeed does after it moves the master, and let the optimizer states be linked again at the next step.
        optimizer._link_all_hp_params()
        optimizer._hp_optimizer_states_linked = False
    return shared


_STAGE3 = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


def lazily_zeroed(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed 1-d tensor whose memory the system maps only as it is written, for fp32/fp64 on CPU: numpy's zeros
    come from calloc, which for large sizes hands back fresh zero pages without touching them, where torch.zeros
    writes every page at once. Elsewhere torch.zeros."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        import numpy as np

        return torch.from_numpy(np.zeros(numel, dtype=np.float32 if dtype == torch.float32 else np.float64))
    return torch.zeros(numel, dtype=dtype, device=device)


def release_gradients_between_steps(engine: Any) -> bool:
    """Hold ZeRO-3's gradient partition only from a step's backward pass to its optimizer step, as torch's
    `zero_grad(set_to_none=True)` does for a plain model. DeepSpeed 0.19 allocates this rank's whole fp32 gradient
    partition once (`grad_partitions_flat_buffer`) and keeps it for the run, between steps too: half a model of
    memory a rank holds for nothing. Here the buffer is freed after every optimizer step and made again, zeroed
    (`lazily_zeroed`: its pages are mapped as the backward pass writes them), before the next backward pass writes
    its first gradient partition (the first micro-batch overwrites it,
    later ones add). Stage 3 on CPU without optimizer offload only (on a GPU the reduce stream writes into it
    asynchronously: untested there); returns whether it applies."""
    optimizer = getattr(engine, "optimizer", None)
    if (engine.zero_optimization_stage() != 3 or not hasattr(optimizer, _STAGE3)
            or getattr(optimizer, "offload_optimizer", False) or engine.device.type != "cpu"):
        return False
    params = [p for group in optimizer.fp16_groups for p in group]
    sizes = [p.partition_numel() for p in params]
    dtype, device = optimizer.grad_partitions_flat_buffer.dtype, optimizer.grad_partitions_flat_buffer.device

    def release() -> None:
        optimizer.grad_partitions_flat_buffer = None
        getattr(optimizer, _STAGE3).clear()  # its views hold the buffer's storage
        optimizer.averaged_gradients = {}

    def ensure() -> None:
        if optimizer.grad_partitions_flat_buffer is not None:
            return
        flat = lazily_zeroed(sum(sizes), dtype, device)
        views, offset = getattr(optimizer, _STAGE3), 0
        for param, size in zip(params, sizes, strict=True):
            views[param.ds_id] = flat.narrow(0, offset, size)
            offset += size
        optimizer.grad_partitions_flat_buffer = flat

    def wrap(method: Any, before: Any = None, after: Any = None) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            result = method(*args, **kwargs)
            if after is not None:
                after()
            return result
        return wrapped

    optimizer.partition_grads = wrap(optimizer.partition_grads, before=ensure)
    optimizer.independent_gradient_partition_epilogue = wrap(optimizer.independent_gradient_partition_epilogue,
                                                             before=ensure)
    optimizer.step = wrap(optimizer.step, before=ensure, after=release)
    release()
    return True


def adamw(groups: list[dict[str, Any]], cfg: ExperimentConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

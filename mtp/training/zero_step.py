"""DeepSpeed's ZeRO-1/2 step without work it does not need (issue 32): the same values, fewer operators and syncs.

Three methods of `DeepSpeedZeroOptimizer` run a handful of operators per parameter every step:
- `get_grad_norm_direct` (gradient clipping's L2 norm) copies each gradient to float64 and takes its norm one tensor
  at a time; here the per-tensor norms come from one `torch._foreach_norm` in float64 (one kernel group on an
  accelerator, the same per-tensor float64 norms), then the same sum, all-reduce and root;
- `_update_model_bit16_weights` points every parameter's `.data` at its slice of the flat bit16 buffer again after
  each step ("we probably don't need this? just to be safe", says its comment); here a parameter that already is
  that slice (same address, shape and strides) is left alone, so only a buffer that moved costs anything;
- `unscale_and_clip_grads` asks on the host whether the norm is finite (`bool(...)`, a sync on an accelerator, once
  per parameter group and step); here a non-finite norm becomes inf on the device (`torch.where`), as DeepSpeed's
  own branch makes it, so the clip factor is the same without the read.
`install()` patches the class once; any other norm (inf), model or pipeline parallelism, or a DeepSpeed whose methods
do not look as expected keeps DeepSpeed's own code.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_ORIGINALS: dict[str, Any] = {}


def _zero_optimizer() -> type | None:
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return None
    return DeepSpeedZeroOptimizer


def foreach_grad_norm(self: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                      norm_type: float = 2) -> torch.Tensor:
    """`get_grad_norm_direct` for the L2 norm without model or pipeline parallelism, from one foreach norm."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if (float(norm_type) != 2.0 or self.model_parallel_rank != 0
            or any(hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated for p in params)):
        return _ORIGINALS["get_grad_norm_direct"](self, gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)][:len(params)]
    if grads:
        with torch.no_grad():  # gradients carry no graph: no detach per tensor (two operators each)
            norms = torch._foreach_norm(grads, 2, dtype=get_norm_dtype())
        total = torch.stack(norms).pow(2).sum().float().to(self.device)
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _is_slice(param: torch.Tensor, flat: torch.Tensor, offset: int, shape: torch.Size) -> bool:
    """Whether `param` already is `flat.narrow(0, offset, numel).view(shape)` (compared on the host, no operator)."""
    return (param.data_ptr() == flat.data_ptr() + offset * flat.element_size() and param.shape == shape
            and param.is_contiguous() and param.dtype == flat.dtype)


def lean_update_bit16_weights(self: Any, group_index: int) -> None:
    """`_update_model_bit16_weights`, re-pointing only the parameters that are not their flat slice already."""
    flat = self.bit16_groups_flat[group_index]
    for p, meta, offset in zip(self.round_robin_bit16_groups[group_index], self.round_robin_bit16_meta[group_index],
                               self.round_robin_bit16_offsets[group_index], strict=True):
        if not _is_slice(p, flat, offset, meta.shape):
            p.data = flat.narrow(0, offset, meta.numel()).view(meta.shape).data
    for param_index, param in enumerate(self.bit16_groups[group_index]):
        source = self.round_robin_bit16_groups[group_index][self.round_robin_bit16_indices[group_index][param_index]]
        if source is not param and (param.data_ptr() != source.data_ptr() or param.shape != source.shape
                                    or param.stride() != source.stride()):
            param.data = source.data


def sync_free_unscale_and_clip(self: Any, grad_groups_flat: list[Any], total_norm: Any) -> None:
    """`unscale_and_clip_grads` with the norm's validity handled on the device."""
    if not torch.is_tensor(total_norm):
        return _ORIGINALS["unscale_and_clip_grads"](self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
        clip_norm = torch.where(invalid, torch.full_like(total_norm, float("inf"), dtype=torch.float), total_norm)
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)
    return None


def _looks_as_expected(cls: type) -> bool:
    """The two methods with the signatures and attributes these replacements were written against."""
    try:
        norm = inspect.signature(cls.get_grad_norm_direct).parameters
        update = inspect.signature(cls._update_model_bit16_weights).parameters
        clip = inspect.signature(cls.unscale_and_clip_grads).parameters
        source = inspect.getsource(cls._update_model_bit16_weights)
        clip_source = inspect.getsource(cls.unscale_and_clip_grads)
    except (AttributeError, OSError, TypeError):
        return False
    return (list(norm) == ["self", "gradients", "params", "norm_type"] and list(update) == ["self", "group_index"]
            and list(clip) == ["self", "grad_groups_flat", "total_norm"] and "round_robin_bit16_offsets" in source
            and "narrow" in source and "is_invalid_grad_norm(clip_norm)" in clip_source
            and "combined_scale = clip * self.loss_scale" in clip_source)


def install() -> bool:
    """Patch DeepSpeed's ZeRO-1/2 optimizer (once); False where its methods are not the ones these replace."""
    cls = _zero_optimizer()
    if cls is None:
        return False
    if _ORIGINALS:
        return True
    if not _looks_as_expected(cls):
        return False
    _ORIGINALS["get_grad_norm_direct"] = cls.get_grad_norm_direct
    _ORIGINALS["_update_model_bit16_weights"] = cls._update_model_bit16_weights
    _ORIGINALS["unscale_and_clip_grads"] = cls.unscale_and_clip_grads
    cls.get_grad_norm_direct = foreach_grad_norm
    cls._update_model_bit16_weights = lean_update_bit16_weights
    cls.unscale_and_clip_grads = sync_free_unscale_and_clip
    return True


def uninstall() -> None:
    """DeepSpeed's own methods back (tests compare both)."""
    cls = _zero_optimizer()
    if cls is not None and _ORIGINALS:
        cls.get_grad_norm_direct = _ORIGINALS.pop("get_grad_norm_direct")
        cls._update_model_bit16_weights = _ORIGINALS.pop("_update_model_bit16_weights")
        cls.unscale_and_clip_grads = _ORIGINALS.pop("unscale_and_clip_grads")

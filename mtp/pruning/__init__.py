"""Pruning the shared encoder to a parameter budget, as hooks at the optimizer step; one module per method.

A method is registered here once, as a `PruningMethod`: its settings (the `pruning:` section when `method` names
it), its hook and its layer (which carries its dense fold and compact form). The trainer, the config, the export,
the comparison and the search find methods through this registry and nothing else; `register` adds one.

Masks and gates act in the forward pass (never by writing zeros into weights), so ZeRO's master copy cannot undo
them. Masks are recomputed once per optimizer step from the (gathered, under ZeRO-3) scores or weights.
Methods (Xia & Shin 2021, after Sanh et al. 2020 and Wang et al. 2020; docs/pruning.md): magnitude, movement,
soft_movement (element-wise), rank (hard-concrete gates over the SVD's ranks) and structured (whole heads and FFN
units, for a physically smaller encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from mtp.hooks import Hook
from mtp.pruning.base import (
    Budget,
    NoPruning,
    PrunableLayer,
    PruningHook,
    PruningSettings,
    accelerator_paths,
    cubic_schedule,
    first_step_at_budget,
    host_reads_are_free,
    make_budget,
    prunable_modules,
)
from mtp.pruning.elementwise import ElementwisePruning, MaskedLinear
from mtp.pruning.magnitude import MagnitudePruning, MagnitudeSettings
from mtp.pruning.movement import MovementPruning, MovementSettings
from mtp.pruning.rank import FactorizedLinear, RankPruning, RankSettings
from mtp.pruning.soft_movement import SoftMovementPruning, SoftMovementSettings
from mtp.pruning.structured import GroupMaskedLinear, StructuredPruning, StructuredSettings
from mtp.pruning.topk import TopK, allocate, threshold_masks, topk_mask
from mtp.schema import WHOLE_MESSAGE, describe_error

__all__ = ["METHODS", "Budget", "ElementwisePruning", "FactorizedLinear", "MaskedLinear", "PrunableLayer",
           "PruningHook", "PruningMethod", "PruningSettings", "RankPruning", "TopK", "accelerator_paths", "allocate",
           "build_pruning", "compact_layers", "cubic_schedule", "first_step_at_budget", "get_method",
           "host_reads_are_free", "make_budget", "parse_settings", "prunable_modules", "pruned_methods",
           "pruning_settings", "register", "threshold_masks", "topk_mask"]


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method: the `pruning:` keys it reads, the hook that prunes, the layer it swaps in."""

    name: str
    settings: type[PruningSettings]
    hook: type[PruningHook] | None  # None: dense training
    layer: type[PrunableLayer] | None


METHODS: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    """Add a method (its settings' `method` literal must be its name); a name is registered once."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"pruning method {method.name!r} is already registered")
    if method.settings.model_fields["method"].default != method.name:
        raise ValueError(f"{method.settings.__name__}.method must default to {method.name!r}")
    METHODS[method.name] = method
    return method


for _method in (PruningMethod("none", NoPruning, None, None),
                PruningMethod("magnitude", MagnitudeSettings, MagnitudePruning, MaskedLinear),
                PruningMethod("movement", MovementSettings, MovementPruning, MaskedLinear),
                PruningMethod("soft_movement", SoftMovementSettings, SoftMovementPruning, MaskedLinear),
                PruningMethod("rank", RankSettings, RankPruning, FactorizedLinear),
                PruningMethod("structured", StructuredSettings, StructuredPruning, GroupMaskedLinear)):
    register(_method)


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise KeyError(f"pruning.method: unknown method {name!r} (one of {', '.join(METHODS)})")
    return METHODS[name]


def pruned_methods() -> list[str]:
    """The names of the methods that prune (every registered one but `none`)."""
    return [name for name, m in METHODS.items() if m.hook is not None]


def compact_layers() -> dict[str, type[PrunableLayer]]:
    """Compact format name -> the layer that reads it back."""
    return {m.layer.compact_format: m.layer for m in METHODS.values() if m.layer is not None}


def parse_settings(value: Any) -> PruningSettings:
    """The `pruning:` section as the settings of the method it names (default `none`); a key of another method, or
    of none, is refused with one line naming it. Used as the section's validator."""
    if isinstance(value, PruningSettings):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(WHOLE_MESSAGE, f"pruning: a mapping of keys, got {value!r}")
    name = value.get("method", "none")
    if name not in METHODS:
        raise PydanticCustomError(WHOLE_MESSAGE, f"pruning.method: unknown method {name!r} "
                                  f"(one of {', '.join(METHODS)})")
    schema = METHODS[name].settings
    for key in value:
        if key not in schema.model_fields:
            owners = [m for m, spec in METHODS.items() if key in spec.settings.model_fields]
            where = f"a key of {', '.join(owners)}" if owners else "unknown key"
            raise PydanticCustomError(WHOLE_MESSAGE, f"pruning.{key}: not a key of method {name!r} ({where})")
    try:
        return schema.model_validate(value)
    except ValidationError as err:
        raise PydanticCustomError(WHOLE_MESSAGE, describe_error(err.errors()[0], "pruning")) from None


def pruning_settings(**values: Any) -> PruningSettings:
    """Settings from keyword arguments, e.g. `pruning_settings(method="rank", budget=0.3)`."""
    try:
        return parse_settings(values)
    except PydanticCustomError as err:
        raise ValueError(str(err)) from None


def build_pruning(settings: PruningSettings, total_steps: int) -> list[Hook]:
    """The hook of `settings.method` (none: no hook)."""
    hook = get_method(settings.method).hook
    return [] if hook is None else [hook(settings, total_steps)]

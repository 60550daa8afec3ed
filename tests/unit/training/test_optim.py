"""DeepSpeed settings mtp fills in, and the stop on a non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed.utils import z3_leaf_module

from mtp.config import load_config
from mtp.model import encoder_layers
from mtp.training.optim import build_ds_config, zero3_layers_as_leaves
from mtp.training.trainer import LossNotFinite, check_finite_loss
from tests.unit.pruning.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[3]


def ds_config(tmp_path: Path, precision: dict, world_size: int = 1, name: str = "cpu_zero2.json") -> dict:
    ds = json.loads((ROOT / "ds_configs" / name).read_text()) | precision
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    return build_ds_config(load_config(ROOT / "configs" / "tiny.yaml", [f"train.deepspeed_config={tmp_path}/ds.json"]),
                           world_size)


def test_bf16_trains_without_the_overflow_check_unless_asked(tmp_path: Path) -> None:
    assert ds_config(tmp_path, {"bf16": {"enabled": True}})["bf16"]["check_grad_overflow"] is False
    asked = ds_config(tmp_path, {"bf16": {"enabled": True, "check_grad_overflow": True}})
    assert asked["bf16"]["check_grad_overflow"] is True
    fp16 = ds_config(tmp_path, {"fp16": {"enabled": True}})  # fp16 needs it for its loss scale: left to DeepSpeed
    assert "check_grad_overflow" not in fp16["fp16"] and "bf16" not in fp16


def test_a_non_finite_loss_stops_the_run_naming_the_tasks() -> None:
    check_finite_loss(10, 0.5, {"rte": 1.0, "stsb": 2.0})
    with pytest.raises(LossNotFinite, match=r"^step 20: the training loss is nan \(tasks: stsb\)"):
        check_finite_loss(20, float("nan"), {"rte": 1.0, "stsb": float("nan")})


@pytest.mark.parametrize("name", ["cpu_zero1.json", "cpu_zero2.json", "gpu_bf16_zero2.json", "gpu_fp16_zero1.json"])
def test_gradient_buffers_follow_the_world_size_unless_set(tmp_path: Path, name: str) -> None:
    """One rank has nothing to reduce: no contiguous gradient buffer, no overlap; ranks get the buffer (and overlap on
    an accelerator, not on this CPU); a value written in the JSON is kept."""
    one = ds_config(tmp_path, {}, 1, name)["zero_optimization"]
    assert one["contiguous_gradients"] is False and one["overlap_comm"] is False
    two = ds_config(tmp_path, {}, 2, name)["zero_optimization"]
    assert two["contiguous_gradients"] is True and two["overlap_comm"] is False  # DS_ACCELERATOR=cpu here
    stated = json.loads((ROOT / "ds_configs" / name).read_text())
    stated["zero_optimization"]["contiguous_gradients"] = True
    kept = ds_config(tmp_path, {"zero_optimization": stated["zero_optimization"]}, 1, name)["zero_optimization"]
    assert kept["contiguous_gradients"] is True


def test_zero3_makes_each_encoder_layer_one_leaf_unless_the_config_says() -> None:
    """Under ZeRO-3 every encoder layer is a ZeRO-3 leaf (its parameters fetched together, its submodules unhooked);
    other stages mark nothing, and a `leaf_module` block of the user's config is left to DeepSpeed."""
    model = tiny_model()
    assert zero3_layers_as_leaves(model, {"zero_optimization": {"stage": 2}}) == 0
    assert zero3_layers_as_leaves(model, {"zero_optimization": {"stage": 3, "leaf_module": {"names": []}}}) == 0
    assert zero3_layers_as_leaves(model, {"zero_optimization": {"stage": 3,
                                                                "stage3_module_granularity_threshold": 10**6}}) == 0
    assert not any(z3_leaf_module(m) for m in model.modules())
    layers = encoder_layers(model)
    assert zero3_layers_as_leaves(model, {"zero_optimization": {"stage": 3}}) == len(layers) > 0
    assert [m for m in model.modules() if z3_leaf_module(m)] == layers

"""DeepSpeed settings mtp fills in, and the stop on a non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp.config import load_config
from mtp.training.optim import build_ds_config
from mtp.training.trainer import LossNotFinite, check_finite_loss

ROOT = Path(__file__).resolve().parents[3]


def ds_config(tmp_path: Path, precision: dict) -> dict:
    ds = json.loads((ROOT / "ds_configs" / "cpu_zero2.json").read_text()) | precision
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    return build_ds_config(load_config(ROOT / "configs" / "tiny.yaml", [f"train.deepspeed_config={tmp_path}/ds.json"]),
                           1)


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

"""bench/mask_overlap.py against numbers worked out by hand on two tiny run folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "mask_overlap.py"


def load_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("mask_overlap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, weight: torch.Tensor, mask: torch.Tensor) -> Path:
    (folder / "final").mkdir(parents=True)
    save_file({"encoder.encoder.layer.0.attention.self.query.weight": weight,
               "encoder.encoder.layer.0.attention.self.query.mask": mask.float(),
               "encoder.encoder.layer.0.output.dense.weight": weight.clone(),
               "encoder.encoder.layer.0.output.dense.mask": mask.float()}, str(folder / "final" / "model.safetensors"))
    return folder


def test_overlap_kept_fractions_and_kept_sizes(tmp_path: Path) -> None:
    script = load_script()
    weight = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean |W| 3
    a = write_run(tmp_path / "a", weight, torch.tensor([[0, 0], [1, 1]]))  # keeps 3 and 6: mean 4.5
    b = write_run(tmp_path / "b", weight, torch.tensor([[1, 0], [0, 1]]))  # keeps 1 and 6: mean 3.5
    rows = script.compare(script.masked_matrices(a), script.masked_matrices(b))
    assert set(rows) == {"all", "type/query", "type/ffn_out", "layer/0"}
    for group in rows.values():
        assert group["kept_fraction_a"] == 0.5 and group["kept_fraction_b"] == 0.5
        assert group["jaccard"] == pytest.approx(1 / 3) and group["a_kept_by_b"] == 0.5
        assert group["kept_abs_over_mean_a"] == pytest.approx(1.5)
        assert group["kept_abs_over_mean_b"] == pytest.approx(3.5 / 3)


def test_a_run_without_masks_is_refused(tmp_path: Path) -> None:
    script = load_script()
    (tmp_path / "dense" / "final").mkdir(parents=True)
    save_file({"w.weight": torch.ones(2, 2)}, str(tmp_path / "dense" / "final" / "model.safetensors"))
    with pytest.raises(SystemExit, match="no masks"):
        script.masked_matrices(tmp_path / "dense")

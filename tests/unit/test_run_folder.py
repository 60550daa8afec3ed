"""The run folder's typed records and checks: results.json read back, kept parameters of dense and pruned runs, the
one-line refusals of a folder that holds no finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp.config import ConfigError
from mtp.run_folder import (
    RunResults,
    checkpoint_step,
    has_weights,
    is_finished,
    latest_checkpoint,
    read_results,
    require_finished_run,
    run_tasks,
    write_results,
)


def test_a_dense_runs_kept_blocks_are_its_encoder_blocks_and_it_is_within_any_budget(tmp_path: Path) -> None:
    write_results(tmp_path, {"finished": True, "steps": 5, "params": {"encoder_blocks": 1000}, "mean_score": 61.5,
                             "tasks": {"rte": {"score": 60.0}, "stsb": {"score": 63.0}}, "wall_time_s": 3.0})
    results = read_results(tmp_path)
    assert results is not None and results.finished and is_finished(tmp_path)
    assert results.kept_blocks == 1000 and results.within_budget
    assert results.task_scores() == {"rte": 60.0, "stsb": 63.0}
    assert results.model_extra["wall_time_s"] == 3.0  # keys the record does not name are kept as they are


def test_a_pruned_runs_record_reads_its_pruning_report() -> None:
    report = {"method": "magnitude", "budget": 500, "kept_blocks": 498, "within_budget": True, "kept_fraction": 0.498,
              "fixed_masks_from_step": 91}
    results = RunResults.model_validate({"finished": True, "params": {"encoder_blocks": 1000}, "pruning": report})
    assert results.kept_blocks == 498 and results.within_budget
    assert results.pruning is not None and results.pruning.model_extra["fixed_masks_from_step"] == 91
    over = RunResults.model_validate({"params": {"encoder_blocks": 1000}, "pruning": {"kept_blocks": 700}})
    assert not over.within_budget  # a report that does not say it is within its budget does not count as within


def test_a_folder_without_a_finished_run_is_refused_in_one_line_naming_the_key(tmp_path: Path) -> None:
    assert read_results(tmp_path) is None and not is_finished(tmp_path) and not has_weights(tmp_path)
    with pytest.raises(ConfigError, match=r"^encoder.init_from: .* holds no finished mtp run \(no final/model"):
        require_finished_run(tmp_path, "encoder.init_from", ["rte"])
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "final" / "mtp.json").write_text(json.dumps({"tasks": [{"name": "rte"}]}))
    assert run_tasks(tmp_path, "distill.teacher") == ["rte"]
    with pytest.raises(ConfigError, match=r"^distill.teacher: .* has no head for task 'stsb'$"):
        require_finished_run(tmp_path, "distill.teacher", ["rte", "stsb"])
    (tmp_path / "final" / "mtp.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^distill.teacher: .*mtp.json is not an mtp run's final/mtp.json$"):
        run_tasks(tmp_path, "distill.teacher")


def test_the_latest_checkpoint_is_read_as_its_tag_and_its_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None and checkpoint_step(None) == 0  # no checkpoint: from step 0
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("")  # being written
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "latest").write_text("step_1250\n")
    assert latest_checkpoint(tmp_path) == "step_1250" and checkpoint_step("step_1250") == 1250
    assert checkpoint_step("final") == 0  # a tag that names no step

"""Integration runs read GLUE rows: without the files every test here is skipped (the unit layer still runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_RUNS = {"zero_runs": "zero_runs", "method_runs": "zero_runs", "teacher_run": "distill_teacher"}
"""Fixtures whose runs are trained once (per session or per module), and the xdist group of the tests that read
them: with `--dist loadgroup` every test of a group runs on one worker, so each shared run trains once; the other
tests of the same modules go to whichever worker is free."""


@pytest.hookimpl(tryfirst=True)  # before xdist names each test by its group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        groups = {SHARED_RUNS[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_RUNS}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} reads runs of two xdist groups: {sorted(groups)}")
        if groups and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


@pytest.fixture(autouse=True)
def _needs_glue(glue_dir: Path) -> None:
    """Skip when the GLUE files are missing (see tests/conftest.py)."""


PRUNE = ["pruning.budget=0.3", "pruning.warmup_ratio=0.25", "pruning.cooldown_ratio=0.25"]
# the ZeRO runs end with two steps at fixed masks (steps 7 and 8), where the scores no longer learn
FIXED_PHASE = ["pruning.cooldown_ratio=0.125", "pruning.finetune_ratio=0.25"]


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, tiny_pretrained: Path) -> dict[int, Path]:
    """The same 8-step 2-rank movement-pruning job (its last two steps at fixed masks; one global threshold over
    every matrix: the scores are gathered across partitions) under ZeRO-0, 1, 2 and 3, from one saved tiny
    checkpoint (ZeRO-3 builds the encoder partitioned and loads it in): what the ZeRO agreement, share, results,
    TensorBoard, budget, export and resume tests read."""
    import json

    from tests.conftest import ROOT, launch

    outs = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        ds_config = ROOT / f"ds_configs/cpu_zero{stage}.json"
        if stage == 3:  # every tensor partitioned (by default ZeRO-3 keeps those under 1e5 elements whole on every
            ds = json.loads(ds_config.read_text())  # rank, which at this scale is most of them)
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            ds_config = out.parent / "zero3_no_persistence.json"
            ds_config.write_text(json.dumps(ds))
        launch(["--config", "configs/tiny.yaml", "pruning.method=movement", *PRUNE, *FIXED_PHASE,
                "pruning.scope=global", f"encoder.name={tiny_pretrained}", "encoder.random_init=false",
                f"train.deepspeed_config={ds_config}", f"output_dir={out}"])
        outs[stage] = out
    return outs

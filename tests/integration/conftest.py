"""Integration runs read GLUE rows: without the files every test here is skipped (the unit layer still runs)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _needs_glue(glue_dir: Path) -> None:
    """Skip when the GLUE files are missing (see tests/conftest.py)."""


PRUNE = ["pruning.budget=0.3", "pruning.warmup_ratio=0.25", "pruning.cooldown_ratio=0.25"]


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory: pytest.TempPathFactory, tiny_pretrained: Path) -> dict[int, Path]:
    """The same 8-step 2-rank movement-pruning job under ZeRO-0, 1, 2 and 3, from one saved tiny checkpoint (ZeRO-3
    builds the encoder partitioned and loads it in): what the ZeRO agreement, results, TensorBoard and resume tests
    read. One set of runs serves both the training and the pruning checks."""
    from tests.conftest import launch

    outs = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        launch(["--config", "configs/tiny.yaml", "pruning.method=movement", *PRUNE, f"encoder.name={tiny_pretrained}",
                "encoder.random_init=false", f"train.deepspeed_config=ds_configs/cpu_zero{stage}.json",
                f"output_dir={out}"])
        outs[stage] = out
    return outs

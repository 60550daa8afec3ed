"""A run's hooks built from its config in one place: the loggers from their registry (rank 0 only), the memory
profile on every rank, a new logger added without touching the trainer, a name that is not registered refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mtp.config import ConfigError, ExperimentConfig, load_config, recipe_dump
from mtp.hooks import Hook
from mtp.training.components import build_observers
from mtp.training.loggers import LOGGERS, ProgressBar, ResultsFile, TensorBoardLogger, check_loggers, register_logger
from mtp.training.memory import MemoryProfiler
from tests.conftest import ROOT


def config(*overrides: str) -> ExperimentConfig:
    return load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={Path('/nonexistent')}", *overrides])


def test_rank_0_gets_the_memory_profile_and_the_default_loggers_in_order_the_others_the_profile_only() -> None:
    hooks = build_observers(config(), {}, rank=0)
    assert [type(h) for h in hooks] == [MemoryProfiler, TensorBoardLogger, ResultsFile, ProgressBar]
    assert [type(h) for h in build_observers(config(), {}, rank=1)] == [MemoryProfiler]
    assert [type(h) for h in build_observers(config("train.loggers=[results]"), {}, rank=0)] == [MemoryProfiler,
                                                                                                 ResultsFile]


def test_a_new_logger_is_registered_and_named_without_touching_the_trainer() -> None:
    class Lines(Hook):
        name = "lines"

        def __init__(self, folder: Path) -> None:
            self.folder = folder

    @register_logger("lines")
    def _lines(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Hook:
        return Lines(Path(cfg.output_dir))

    try:
        hooks = build_observers(config("train.loggers=[results, lines]"), {}, rank=0)
        assert [type(h) for h in hooks] == [MemoryProfiler, ResultsFile, Lines]
        assert hooks[-1].folder.name == "nonexistent"
    finally:
        del LOGGERS["lines"]


def test_an_unknown_logger_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^train.loggers: unknown logger 'wandb' \(one of tensorboard, results, "
                                          r"progress\)$"):
        check_loggers(config("train.loggers=[results, wandb]").train.loggers)


def test_the_default_loggers_leave_the_recipe_fingerprint_as_it_was() -> None:
    assert "loggers" not in recipe_dump(config())
    assert "loggers" in recipe_dump(config("train.loggers=[results]"))


def test_a_key_added_to_one_method_leaves_every_recipe_fingerprint_as_it_was_at_its_neutral_value() -> None:
    """attention_share came after structured runs were fingerprinted: null (the method before it) keeps their
    fingerprint; its default (a third) is a new recipe and says so; other methods never see the key."""
    structured = ("pruning.method=structured", "pruning.budget=0.3")
    assert "attention_share" not in recipe_dump(config(*structured, "pruning.attention_share=null"))
    assert "attention_share: 0.3333" in recipe_dump(config(*structured))
    assert recipe_dump(config(*structured)) == recipe_dump(config(*structured, "pruning.attention_share=0.3333"))
    assert "attention_share: 0.3" in recipe_dump(config(*structured, "pruning.attention_share=0.3"))
    assert "attention_share" not in recipe_dump(config("pruning.method=magnitude", "pruning.budget=0.3"))


def test_a_method_version_above_one_changes_its_runs_fingerprints_and_no_others() -> None:
    from mtp.pruning import RankSettings

    rank, magnitude = config("pruning.method=rank", "pruning.budget=0.3"), config("pruning.method=magnitude",
                                                                                  "pruning.budget=0.3")
    before = recipe_dump(rank), recipe_dump(magnitude)
    assert "method_version" not in before[0]
    RankSettings.version = 2
    try:
        assert recipe_dump(rank) != before[0] and "method_version: 2" in recipe_dump(rank)
        assert recipe_dump(magnitude) == before[1]
    finally:
        RankSettings.version = 1
    assert recipe_dump(rank) == before[0]


def test_the_progress_logger_writes_plain_lines_to_a_file_and_a_bar_to_a_terminal() -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    scalars = {"train/loss": 0.5, "train/tokens_per_s": 900.0, "train/batches/rte": 3.0, "train/batches/stsb": 7.0}
    for stream, tty in ((io.StringIO(), False), (Terminal(), True)):
        bar = ProgressBar(stop_after_steps=None, stream=stream)
        bar.on_train_start(0, 20)
        for step in range(1, 11):
            bar.on_optimizer_step(None, step)
        bar.on_log(10, scalars)
        bar.on_results({})
        text = stream.getvalue()
        if tty:
            assert "\r" in text and "10/20" in text
        else:  # one plain line per log step, no redraws
            assert text == "train: step 10/20 loss=0.500 tok/s=900 mix[rte:3 stsb:7]\n"

"""The report's list of unfinished runs and `--only`'s selection: no data, no training."""

from __future__ import annotations

import pytest

from mtp.compare import CompareConfig, plan_runs
from mtp.compare.plan import only_pattern, select_runs
from mtp.compare.report import unfinished_line
from mtp.config import ConfigError


def test_few_unfinished_runs_are_named_many_are_counted_per_method() -> None:
    assert unfinished_line(["mt-rank-0.1", "st-rte-rank-0.02"], {"rank": 2}) == \
        "Runs not finished yet: mt-rank-0.1, st-rte-rank-0.02"
    names = [f"st-rte-rank-{i}" for i in range(10)] + [f"st-rte-structured-{i}" for i in range(5)]
    line = unfinished_line(names, {"rank": 10, "structured": 5})
    assert line.startswith("Runs not finished yet: 15 (rank 10, structured 5);") and "st-rte-rank-0" not in line


def test_only_selects_in_plan_order_and_refuses_a_bad_expression() -> None:
    runs = plan_runs(CompareConfig(base="configs/tiny.yaml", methods=["magnitude", "rank"], budgets=[0.5],
                                   single_task_sizes=[0.1]), ["rte", "stsb"])
    chosen = select_runs(runs, r"^st-.*-rank-")
    assert [s.name for s in chosen] == [s.name for s in runs if s.name.startswith("st-") and "-rank-" in s.name]
    # the sizes of the grid, of the equal split at B = 0.5 and of the low-resource table
    assert [s.name for s in chosen] == ["st-rte-rank-0.1", "st-rte-rank-0.25", "st-rte-rank-0.5",
                                        "st-stsb-rank-0.1", "st-stsb-rank-0.25", "st-stsb-rank-0.5"]
    assert select_runs(runs, None) == runs and only_pattern(None) is None
    with pytest.raises(ConfigError, match=r"--only: 'rank\|\(' is not a regular expression"):
        select_runs(runs, "rank|(")

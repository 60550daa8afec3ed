"""The comparison without runs: the allocation search against a brute-force reference, the plan."""

from __future__ import annotations

import random
from itertools import product

import pytest

from mtp.compare import Choice, CompareConfig, best_allocation, plan_runs


def brute_force_allocation(choices: list[list[Choice]], capacity: int) -> tuple[list[Choice], float] | None:
    """The reference: try every allocation."""
    best = None
    for combo in product(*choices):
        if sum(c.size for c in combo) <= capacity:
            mean = sum(c.score for c in combo) / len(combo)
            if best is None or mean > best[1]:
                best = (list(combo), mean)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_allocation_search_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    tasks = rng.randint(1, 4)
    choices = [[Choice(rng.randint(1, 50), rng.uniform(0, 100), f"{t}-{i}") for i in range(rng.randint(1, 5))]
               for t in range(tasks)]
    capacity = rng.randint(0, 120)
    fast, slow = best_allocation(choices, capacity), brute_force_allocation(choices, capacity)
    if slow is None:
        assert fast is None  # no allocation fits: reported as None, not a crash
    else:
        assert fast is not None and fast[1] == pytest.approx(slow[1])
        assert sum(c.size for c in fast[0]) <= capacity


def test_no_allocation_fits_and_missing_task_choices() -> None:
    choices = [[Choice(10, 80.0, "a")], [Choice(10, 70.0, "b")]]
    assert best_allocation(choices, 19) is None
    assert best_allocation([[Choice(1, 1.0, "a")], []], 100) is None
    best = best_allocation([[Choice(5, 60.0, "s"), Choice(9, 90.0, "l")], [Choice(5, 50.0, "s"), Choice(9, 55.0, "l")]],
                           14)
    assert best is not None and [c.label for c in best[0]] == ["l", "s"] and best[1] == pytest.approx(70.0)


def test_plan_covers_equal_split_and_low_resource_sizes() -> None:
    cfg = CompareConfig(base="configs/tiny.yaml", methods=["movement"], budgets=[0.5, 0.2], single_task_sizes=[0.05],
                        low_resource_tasks=["rte"])
    names = {s.name for s in plan_runs(cfg, ["rte", "stsb"])}
    assert {"mt-dense", "mt-movement-0.5", "mt-movement-0.2"} <= names
    assert {"st-stsb-movement-0.25", "st-stsb-movement-0.1", "st-stsb-movement-0.05"} <= names  # B/T and grid
    assert {"st-rte-movement-0.5", "st-rte-movement-0.2"} <= names and "st-stsb-movement-0.5" not in names

"""The best ensemble: an exact multiple-choice knapsack over the single-task runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """One single-task model that could join an ensemble."""

    size: int  # kept encoder-block parameters
    score: float
    label: str


def best_allocation(choices: list[list[Choice]], capacity: int) -> tuple[list[Choice], float] | None:
    """The ensemble (one choice per task) with total size <= capacity and the highest mean score.

    Exact: a multiple-choice knapsack solved over Pareto frontiers of (size, score sum); None if no
    allocation fits (or a task has no choice).
    """
    if not choices or any(not c for c in choices):
        return None
    frontier: list[tuple[int, float, tuple[Choice, ...]]] = [(0, 0.0, ())]
    for options in choices:
        merged = [(size + c.size, score + c.score, picked + (c,)) for size, score, picked in frontier
                  for c in options if size + c.size <= capacity]
        merged.sort(key=lambda x: (x[0], -x[1]))
        frontier = []
        best = float("-inf")
        for item in merged:  # keep only states that beat every smaller one
            if item[1] > best:
                frontier.append(item)
                best = item[1]
        if not frontier:
            return None
    size, score, picked = max(frontier, key=lambda x: (x[1], -x[0]))
    return list(picked), score / len(choices)


def largest_member(budget: float, smallest_by_task: dict[str, float], task: str) -> float:
    """The largest single-task size of `task` that can join an ensemble under `budget` (a fraction of one encoder's
    blocks): every other task's member takes at least its smallest size."""
    return budget - sum(size for other, size in smallest_by_task.items() if other != task)

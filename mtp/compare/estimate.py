"""How long the runs left to train take: what `mtp compare --plan` and `mtp compare` say before they start."""

from __future__ import annotations

import statistics

from mtp.compare.plan import ComparePlan, RunSpec
from mtp.compare.store import finished_results
from mtp.run_folder import checkpoint_step, latest_checkpoint


def _kind(spec: RunSpec) -> str:
    """The runs whose step costs alike: one task's (or the multitask) dense or pruned runs."""
    return f"{spec.task or 'multitask'} {'dense' if spec.method == 'none' else 'pruned'}"


def _steps_done(plan: ComparePlan, spec: RunSpec) -> int:
    """The step a run to train resumes from: its checkpoint's (0 without one, or while one is being written)."""
    return checkpoint_step(latest_checkpoint(plan.cfg.run_folder(spec.name)))


def time_left(plan: ComparePlan, going: list[RunSpec], from_scratch: set[str] | None = None,
              waiting: int = 0) -> str | None:
    """How long the runs to train (`going`) take, one at a time, at the median seconds per optimizer step of the
    finished runs of the same kind (`_kind`; their results' wall time, evaluations included, over their steps, on
    whatever machine trained them), each from its checkpoint's step but those named in `from_scratch` (a folder set
    aside first: stale, or trained again by --retrain); a run trained by epochs
    counts the steps of its own kept results (a teacher trained again), else its length is unknown. `waiting`
    second seeds are named, not counted. Each run's kept results are read once. None when nothing is to train."""
    if not going:
        return None
    finished = {spec.name: finished_results(plan, spec) for spec in plan.runs}
    per_step: dict[str, list[float]] = {}
    for spec in plan.runs:
        results = finished.get(spec.name) or {}
        if results.get("steps") and results.get("wall_time_s"):
            per_step.setdefault(_kind(spec), []).append(results["wall_time_s"] / results["steps"])
    seconds, counted, no_rate, by_epochs = 0.0, 0, 0, 0
    for spec in going:
        steps = plan.experiment(spec).train.max_steps or (finished.get(spec.name) or {}).get("steps")
        if not steps:
            by_epochs += 1
        elif _kind(spec) not in per_step:
            no_rate += 1
        else:
            done = 0 if spec.name in (from_scratch or ()) else _steps_done(plan, spec)
            seconds += max(steps - done, 0) * statistics.median(per_step[_kind(spec)])
            counted += 1
    head = "time left: unknown"
    if counted:
        head = (f"time left: about {_duration(seconds)} of training for {_runs(counted)}, one at a time at the median "
                "seconds per step of the finished runs of the same task, dense or pruned")
    notes = [f"{_runs(no_rate)} with no finished run of the same task, dense or pruned, to go by"] * bool(no_rate)
    notes += [f"{_runs(by_epochs)} trained by epochs, of unknown length"] * bool(by_epochs)
    notes += [f"{_runs(waiting)} waiting for their grid, not counted"] * bool(waiting)
    return head + ("; " if counted else ": ") + "; ".join(notes) if notes else head


def _runs(n: int) -> str:
    return f"{n} run{'s' * (n != 1)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

"""`mtp compare`: check the plan, train what is missing, write the report."""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from pathlib import Path

from mtp.checks import check_experiment
from mtp.compare.config import load_compare_config
from mtp.compare.estimate import time_left
from mtp.compare.plan import ComparePlan, RunSpec, is_member_seed, only_pattern, retrain_pattern, select_runs
from mtp.compare.report import member_seed_decisions, write_report
from mtp.compare.runner import run_all
from mtp.compare.store import (
    claim_holder,
    has_current_weights,
    holds_other_recipe,
    retrain_state,
    run_state,
    superseded_results,
    wants_weights,
)
from mtp.config import ConfigError, load_config
from mtp.schema import resolve_path


def _load_plan(config: str | Path, overrides: list[str]) -> ComparePlan:
    """The compare YAML with its overrides, as a plan; config errors (ConfigError, exit 2) before anything runs."""
    cfg = load_compare_config(config, overrides)
    base = Path(cfg.base) if Path(cfg.base).is_file() else resolve_path(cfg.base, f"{config}: base")
    plan = ComparePlan.build(cfg, base)
    if "low_resource_tasks" in cfg.model_fields_set:
        unknown = [t for t in cfg.low_resource_tasks if t not in plan.tasks]
        if unknown:
            raise ConfigError(f"{config}: low_resource_tasks: {unknown[0]!r} is not a task of {cfg.base}")
    return plan


RETRAIN_STATE = "to train again (--retrain"
STATES = ("finished", "claimed", "resumes", "stale", "to train", "waits", "skipped")
"""The kinds of state `describe_plan` tallies (each line's state starts with one)."""


def describe_plan(config: str | Path, overrides: list[str], only: str | None = None,
                  retrain: str | None = None) -> str:
    """One line per planned run (those matching `only`): its name, length and where it stands (finished, claimed,
    resumable, stale, to train; a second seed of a single-task run also waits for the grid or is skipped when its
    first seed is not a best-ensemble member; a finished run that `retrain` matches is to train again), then the
    count of each state with the teachers that would be trained again first, and the time left (`time_left`).
    Reads the run folders and kept results; trains nothing, writes nothing."""
    only_pattern(only)
    plan = _load_plan(config, overrides)
    chosen = select_runs(plan.runs, only)
    retrain_re = retrain_pattern(retrain, plan.runs, only)
    weights_wanted = wants_weights(chosen, only)
    decisions = member_seed_decisions(plan) if any(is_member_seed(s) for s in chosen) else {}
    states = []
    for spec in chosen:
        state = run_state(plan, spec, weights_wanted)
        again = retrain_state(plan, spec, retrain_re)
        earlier = superseded_results(plan.cfg, spec.name)
        if again == "again":
            state = f"{RETRAIN_STATE}: its results move to {earlier.parent})"
        elif again == "done":
            state = f"finished (trained again already: its earlier results are in {earlier})"
        if decisions.get(spec.name) and state.startswith(("to train", "resumes")):
            state = decisions[spec.name]
        states.append(state)
    lengths = []
    for spec in chosen:
        train = plan.experiment(spec).train
        lengths.append(f"{train.max_steps} steps" if train.max_steps else f"{train.epochs:g} epochs")
    width = max((len(s.name) for s in chosen), default=0)
    lines = [f"{s.name:<{width}}  {length:>12}  {state}" for s, length, state in zip(chosen, lengths, states,
                                                                                    strict=True)]
    tally = Counter(next(k for k in STATES if state.startswith(k)) for state in states)
    going = [(spec, state) for spec, state in zip(chosen, states, strict=True) if trains(state)]
    teachers = teachers_again(plan, [spec for spec, _ in going])
    count = f" (and {len(teachers)} teacher{'s' * (len(teachers) > 1)} again: {', '.join(teachers)})" \
        if teachers else ""
    lines.append(f"{len(chosen)} runs: " + ", ".join(f"{tally[k]} {k}" for k in STATES if tally[k]) + count)
    # set aside before training, so trained from step 0: stale folders (a teacher's too) and runs --retrain trains again
    from_scratch = {spec.name for spec, state in going if state.startswith(("stale", RETRAIN_STATE))}
    from_scratch |= {t for t in teachers if holds_other_recipe(plan, plan.by_name[t])}
    estimate = time_left(plan, [spec for spec, _ in going] + [plan.by_name[t] for t in teachers], from_scratch,
                         waiting=tally["waits"])
    if estimate:
        lines.append(estimate)
    return "\n".join(lines)


def trains(state: str) -> bool:
    """Whether `mtp compare` would train a run in this state (a stale folder is set aside first; a shared teacher of
    another recipe is refused instead)."""
    return state.startswith(("to train", "resumes", "stale")) and not state.endswith("refused)")


def teachers_again(plan: ComparePlan, to_train: list[RunSpec]) -> list[str]:
    """The teachers this process would train again before `to_train` (the runs it will train): those outside it
    whose weights of this recipe are not here and that no live process holds the claim of (`run_all` adds every
    teacher without weights; a claimed one is then left to its holder)."""
    names = {s.name for s in to_train}
    teachers = sorted({s.teacher for s in to_train if s.teacher is not None} - names)
    return [t for t in teachers if not has_current_weights(plan, plan.by_name[t])
            and claim_holder(plan.cfg.run_folder(t)) is None]


def compare(config: str | Path, overrides: list[str], parallel: int = 1, only: str | None = None,
            report_only: bool = False, retrain: str | None = None) -> Path:
    """Check one multitask and one single-task run of the plan (exit 2 on errors before anything trains), train the
    runs not finished yet (those matching `only`) and, once, the finished pruned runs that `retrain` matches, and
    write the report; returns report.md."""
    only_pattern(only)
    if retrain is not None and report_only:
        raise ConfigError("--retrain trains runs again and --report-only trains nothing: give one of them")
    plan = _load_plan(config, overrides)
    retrain_pattern(retrain, plan.runs, only)
    cfg, base = plan.cfg, plan.base_path
    for spec in (plan.runs[0], next(s for s in plan.runs if s.task is not None)):
        run_overrides = [*cfg.overrides, *spec.overrides, "output_dir=/nonexistent/mtp-check"]
        if spec.method != "none":
            smallest = min(cfg.budgets + cfg.single_task_sizes)
            run_overrides += [f"pruning.method={spec.method}", f"pruning.budget={smallest}"]
        check_experiment(load_config(base, run_overrides), cfg.nproc, resume=False)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "compare.yaml").write_text(Path(config).read_text())
    if not report_only:
        status = run_all(plan, parallel=parallel, only=only, retrain=retrain)
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        if failed:
            print(f"mtp compare: {len(failed)} runs failed: {', '.join(failed)} (see their launch.log)",
                  file=sys.stderr)
    selection = ["--only", shlex.quote(only)] if only else []  # what reproduces these runs, not the whole grid
    command = " ".join(["mtp compare --config", shlex.quote(str(config)), *map(shlex.quote, overrides), *selection])
    return write_report(plan, command)

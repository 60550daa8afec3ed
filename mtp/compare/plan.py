"""The plan: every run the comparison needs, and the overrides of the base experiment that make each one."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtp.compare.allocation import largest_member
from mtp.compare.config import CompareConfig
from mtp.config import ConfigError, ExperimentConfig, load_config, recipe_dump
from mtp.schema import parse_overrides


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str  # "none" for dense
    size: float  # fraction of one encoder's blocks; 1.0 dense
    task: str | None  # None: multitask
    overrides: tuple[str, ...] = field(default=())
    teacher: str | None = None  # the dense run this one starts from and distils from
    seed: int | None = None  # an extra seed of the multitask model (spread_seeds); None: the recipe's seed

    @property
    def key(self) -> tuple[str | None, str, float, int | None]:
        """What the run is: (task or None, method, size, extra seed); the report looks runs up by it."""
        return self.task, self.method, round(self.size, 6), self.seed


def _fmt(size: float) -> str:
    return f"{size:g}"


def plan_runs(cfg: CompareConfig, tasks: list[str], single_task_steps: dict[str, int] | None = None) -> list[RunSpec]:
    """Every run the comparison needs, multitask first; `single_task_steps` (task -> optimizer steps) sets the
    length of the pruned single-task runs (a task it leaves out keeps the length its overrides give)."""
    runs: list[RunSpec] = []
    t = len(tasks)
    mt = tuple(cfg.multitask_overrides)
    if cfg.dense_baselines:
        runs.append(RunSpec("mt-dense", "none", 1.0, None, mt))
    for method in cfg.methods:
        for b in cfg.budgets:
            runs.append(RunSpec(f"mt-{method}-{_fmt(b)}", method, b, None, mt))
    for method in cfg.methods:
        for b in cfg.spread_budgets:
            for seed in cfg.spread_seeds:
                runs.append(RunSpec(f"mt-{method}-{_fmt(b)}-seed{seed}", method, b, None, (*mt, f"train.seed={seed}"),
                                    seed=seed))
    st = tuple(cfg.single_task_overrides)
    sizes = sorted({round(s, 6) for s in cfg.single_task_sizes} | {round(b / t, 6) for b in cfg.budgets})
    for task in tasks:
        if cfg.dense_baselines:
            runs.append(RunSpec(f"st-{task}-dense", "none", 1.0, task, st))
        task_sizes = set(sizes)
        if task in cfg.low_resource_tasks:
            task_sizes |= {round(b, 6) for b in cfg.budgets}
        for method in cfg.methods:
            for s in sorted(task_sizes):
                runs.append(RunSpec(f"st-{task}-{method}-{_fmt(s)}", method, s, task, st))
    if cfg.member_seeds and cfg.member_seeds_budget is not None:
        smallest = dict.fromkeys(tasks, min(sizes))  # every task runs the common sizes; low-resource ones add more
        for task in tasks:
            largest = largest_member(cfg.member_seeds_budget, smallest, task)
            for method in cfg.methods:
                candidates = set(sizes) | ({round(b, 6) for b in cfg.budgets} if task in cfg.low_resource_tasks
                                           else set())
                for s in sorted(candidates):
                    if s > largest + 1e-9:
                        continue
                    for seed in cfg.member_seeds:
                        runs.append(RunSpec(f"st-{task}-{method}-{_fmt(s)}-seed{seed}", method, s, task,
                                            (*st, f"train.seed={seed}"), seed=seed))
    planned = []
    for spec in runs:
        teacher = None
        if spec.method != "none":
            teacher = ("mt-dense" if spec.task is None else f"st-{spec.task}-dense") if cfg.teachers else None
            source = [] if teacher is None else [f"distill.teacher={cfg.run_folder(teacher)}"]
            if teacher is not None and spec.method not in cfg.start_from_pretrained:
                source.insert(0, f"encoder.init_from={cfg.run_folder(teacher)}")
            length = () if spec.task not in (single_task_steps or {}) else (
                f"train.max_steps={single_task_steps[spec.task]}",)
            spec = replace(spec, overrides=spec.overrides + tuple(cfg.pruned_overrides) + length + tuple(source))
        by_run = tuple(o for pattern, extra in cfg.overrides_by_run.items() if re.search(pattern, spec.name)
                       for o in extra)
        planned.append(replace(spec, overrides=spec.overrides + by_run, teacher=teacher))
    return planned


def only_pattern(only: str | None, flag: str = "--only") -> re.Pattern[str] | None:
    """`--only` (or another flag's run-name pattern) as a compiled regular expression (None selects every run); a bad
    one is a ConfigError (exit 2)."""
    if only is None:
        return None
    try:
        return re.compile(only)
    except re.error as err:
        raise ConfigError(f"{flag}: {only!r} is not a regular expression ({err})") from None


def retrain_pattern(retrain: str | None, runs: list[RunSpec], only: str | None = None) -> re.Pattern[str] | None:
    """`--retrain` as a compiled regular expression; one that matches no pruned run among the planned `runs` that
    `only` selects is a ConfigError (exit 2): dense runs are not trained again by it."""
    pattern = only_pattern(retrain, "--retrain")
    if pattern is not None and not any(s.method != "none" and pattern.search(s.name) for s in select_runs(runs, only)):
        raise ConfigError(f"--retrain: {retrain!r} matches no pruned run of the plan"
                          f"{' that --only selects' if only is not None else ''} (dense runs are not trained again by "
                          "it)")
    return pattern


def select_runs(runs: list[RunSpec], only: str | None) -> list[RunSpec]:
    """The planned runs whose name `only` matches (re.search), in plan order; every run when `only` is None."""
    pattern = only_pattern(only)
    return [s for s in runs if pattern is None or pattern.search(s.name)]


def is_member_seed(spec: RunSpec) -> bool:
    """Whether a planned run is an extra seed of a single-task run (member_seeds)."""
    return spec.task is not None and spec.seed is not None


@dataclass
class ComparePlan:
    """The comparison's plan, made once per command: its config, the base experiment (read once), every planned run,
    and each run's recipe fingerprint (computed once, on first use). Every step of the walk (check, train, report)
    takes this object."""

    cfg: CompareConfig
    base_path: Path
    base: ExperimentConfig
    runs: list[RunSpec]
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _earlier_fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: CompareConfig, base_path: Path) -> ComparePlan:
        base = load_config(base_path, list(cfg.overrides))
        tasks = [t.name for t in base.tasks]
        steps = single_task_steps(cfg, base_path, tasks)
        return cls(cfg, Path(base_path), base, plan_runs(cfg, tasks, steps))

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.base.tasks]

    @property
    def by_name(self) -> dict[str, RunSpec]:
        return {s.name: s for s in self.runs}

    def overrides(self, spec: RunSpec) -> list[str]:
        """The dotted overrides of the base experiment that make this run (all but its output dir)."""
        args = [*self.cfg.overrides, *spec.overrides]
        if spec.method != "none":
            args += [f"pruning.method={spec.method}", f"pruning.budget={spec.size}"]
        if spec.task is not None:
            args.append(f"tasks={json.dumps([self._task_entry(spec.task)])}")
        return args

    def experiment(self, spec: RunSpec, extra: list[str] | None = None) -> ExperimentConfig:
        """The run's resolved experiment config."""
        return load_config(self.base_path, [*self.overrides(spec), *(extra or [])])

    def fingerprint(self, spec: RunSpec) -> str:
        """A hash of the run's whole resolved experiment config (output dir aside, its teacher named by the folder the
        config file gives it, CompareConfig.recorded_teacher_folder): a changed recipe changes it, a moved folder
        does not."""
        if spec.name not in self._fingerprints:
            self._fingerprints[spec.name] = self.recorded_hash(spec, self.experiment(spec))
        return self._fingerprints[spec.name]

    def matches(self, stored: str, spec: RunSpec) -> bool:
        """Whether a stored fingerprint is this run's recipe: today's, or the one kept before the teacher was named by
        the config file's folder (its path as this command places it: results trained with output_dir or
        teachers_dir given on the command line stay current)."""
        if stored == self.fingerprint(spec):
            return True
        if spec.teacher is None:
            return False
        if spec.name not in self._earlier_fingerprints:
            self._earlier_fingerprints[spec.name] = recipe_hash(self.experiment(spec, ["output_dir=."]))
        return stored == self._earlier_fingerprints[spec.name]

    def recorded_hash(self, spec: RunSpec, exp: ExperimentConfig) -> str:
        """The fingerprint of `exp` as one of `spec`'s recipes: its output dir aside, and its teacher, where it is this
        plan's folder for it, named by the folder the config file gives it (a saved run config is checked so too)."""
        exp = exp.model_copy(deep=True)
        exp.output_dir = "."
        if spec.teacher is not None:
            here = str(self.cfg.run_folder(spec.teacher))
            recorded = str(self.cfg.recorded_teacher_folder(spec.teacher))
            if exp.encoder.init_from == here:
                exp.encoder.init_from = recorded
            if exp.distill.teacher == here:
                exp.distill.teacher = recorded
        return recipe_hash(exp)

    def _task_entry(self, task: str) -> dict[str, Any]:
        """The base experiment's entry for `task` (keeps its subsampling, weight and custom-file settings)."""
        for entry in self.base.tasks:
            if entry.name == task:
                return entry.model_dump(exclude_defaults=True)
        raise ConfigError(f"compare: task {task!r} is not in {self.base_path}")


def single_task_steps(cfg: CompareConfig, base_path: Path, tasks: list[str]) -> dict[str, int] | None:
    """Each pruned single-task run's optimizer steps, from `single_task_steps` (None, or a task a mapping leaves out:
    its overrides decide). With
    "match_exposure" the tasks' train rows are read once to work out the multitask sampling probabilities."""
    if cfg.single_task_steps is None:
        return None
    if isinstance(cfg.single_task_steps, int):
        return dict.fromkeys(tasks, cfg.single_task_steps)
    if isinstance(cfg.single_task_steps, dict):
        stray = next((t for t in cfg.single_task_steps if t not in tasks), None)
        if stray is not None:
            raise ConfigError(f"compare: single_task_steps: {stray!r} is not one of the tasks ({', '.join(tasks)})")
        return dict(cfg.single_task_steps)
    from mtp.data import load_tasks, task_probabilities

    _refuse_per_run_lengths(cfg, tasks)
    first_pruned = [*cfg.overrides, *cfg.multitask_overrides, *cfg.pruned_overrides]
    multitask = load_config(base_path, first_pruned)
    alone = load_config(base_path, [*cfg.overrides, *cfg.single_task_overrides, *cfg.pruned_overrides])
    if multitask.train.max_steps is None:
        raise ConfigError("compare: single_task_steps: match_exposure needs the multitask runs' train.max_steps")
    sizes = {t.name: len(t.train_texts) for t in load_tasks(multitask)}
    probs = task_probabilities(multitask, sizes)
    batches = multitask.train.max_steps * multitask.train.grad_accum
    return {t: max(1, round(batches * probs[t] / alone.train.grad_accum)) for t in tasks}


# keys (and the sections above them) whose overrides change how many batches of each task a run sees
_LENGTH_KEYS = ("train.max_steps", "train.epochs", "train.grad_accum", "sampling", "tasks")


def _refuse_per_run_lengths(cfg: CompareConfig, tasks: list[str]) -> None:
    """match_exposure reads the multitask length from multitask_overrides and pruned_overrides: an overrides_by_run
    entry that changes a pruned run's length or sampling would make the matched steps wrong, so it is refused."""
    pruned = [spec.name for spec in plan_runs(cfg, tasks) if spec.method != "none"]
    for pattern, extra in cfg.overrides_by_run.items():
        hit = next((name for name in pruned if re.search(pattern, name)), None)
        key = next((k for k, _ in parse_overrides(list(extra))
                    if any(k == name or k.startswith(name + ".") or name.startswith(k + ".") for name in _LENGTH_KEYS)),
                   None)
        if hit is not None and key is not None:
            raise ConfigError(f"compare: overrides_by_run: {pattern!r} sets {key} of {hit}, which single_task_steps: "
                              "match_exposure does not see; give single_task_steps as a number of steps instead")


def recipe_hash(exp: ExperimentConfig) -> str:
    """The fingerprint of a resolved experiment (mtp.config.recipe_dump, hashed)."""
    return hashlib.sha256(recipe_dump(exp).encode()).hexdigest()[:16]

"""The comparison's config (the compare YAML), loaded by the one config loader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator

from mtp.config import ConfigError
from mtp.pruning import pruned_methods
from mtp.schema import Strict, load_yaml, read_yaml


class CompareConfig(Strict):
    base: str
    """The experiment YAML every run starts from (encoder, tasks, data, training recipe)."""
    overrides: list[str] = Field(default_factory=list)
    """Dotted overrides for every run."""
    methods: list[str] = Field(default_factory=lambda: ["movement", "rank"])
    """Pruning methods (names in mtp.pruning's registry)."""
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.25, 0.1])
    """Encoder budgets B, as fractions of one dense encoder's block parameters."""
    single_task_sizes: list[float] = Field(default_factory=list)
    """Grid of single-task sizes b; B/T for every B (and B itself for low-resource tasks) are always added."""
    dense_baselines: bool = True
    multitask_overrides: list[str] = Field(default_factory=list)
    single_task_overrides: list[str] = Field(default_factory=list)
    single_task_steps: int | Literal["match_exposure"] | dict[str, int] | None = Field(None)
    """Optimizer steps of every pruned single-task run: a number; a mapping task -> steps (the tasks it leaves out
    keep the length single_task_overrides give them); or "match_exposure" (each task's run takes as many batches of
    its task as the pruned multitask model sees: multitask steps x grad_accum x p_task, from the sampling strategy
    and the tasks' train rows). None: single_task_overrides decide."""
    pruned_overrides: list[str] = Field(default_factory=list)
    """Extra overrides for every pruned run (schedule, distillation weights), after the two above; dense runs keep
    their recipe."""
    teachers: bool = False
    """Every pruned run starts from the dense run of its task set (mt-dense for the multitask model, st-TASK-dense for
    TASK alone: encoder.init_from) and distils from it (distill.teacher); dense runs are trained first."""
    start_from_pretrained: list[str] = Field(default_factory=list)
    """With `teachers: true`: the methods whose pruned runs start from the pretrained encoder (not from the teacher's
    weights) and still distil from the teacher, as movement pruning's authors trained (Sanh et al. 2020)."""
    overrides_by_run: dict[str, list[str]] = Field(default_factory=dict)
    """Extra overrides for the runs whose name matches a regular expression (e.g. '^st-.*-rank-'), after the others."""
    spread_seeds: list[int] = Field(default_factory=list)
    """Extra seeds (train.seed) of the multitask model at `spread_budgets`, for every method: the run-to-run spread
    that tells a difference between the multitask model and the ensembles from noise."""
    spread_budgets: list[float] = Field(default_factory=list)
    member_seeds: list[int] = Field(default_factory=list)
    """Extra seeds of every single-task run that can be a member of an ensemble at `member_seeds_budget` (its size
    at most B - (T - 1) x the smallest): the ensemble side's spread, reported beside the multitask model's."""
    member_seeds_budget: float | None = None
    member_seeds_for: Literal["best_ensemble", "every_candidate"] = "best_ensemble"
    """Which of those seeds are trained: "best_ensemble" (each method's best-ensemble members at the budget, chosen
    on the first seeds once every candidate has finished; the others are planned but skipped) or "every_candidate"."""
    low_resource_tasks: list[str] = Field(default_factory=lambda: ["rte", "mrpc", "stsb"])
    output_dir: str = "runs/compare"
    teachers_dir: str | None = None
    """Another comparison's output_dir whose dense runs are this one's (teachers and dense baselines): a dense run
    found there with this plan's recipe is reused, a missing one is trained there, one with another recipe is an
    error. A teacher is trained once and shared by the studies built on it."""
    results_dir: str | None = None
    """A light folder apart from output_dir: the report and every finished run's results (runs/NAME.json, without
    checkpoints or weights). A run found there with the same recipe counts as finished, so the comparison
    continues from this folder alone in another checkout or on another machine: commit it. Default: the report
    goes to output_dir."""
    nproc: int = Field(2, gt=0)
    """DeepSpeed ranks per run (launch.sh --nproc)."""
    launcher_args: list[str] = Field(default_factory=list)
    """Extra launch.sh arguments for every run (e.g. --hostfile FILE)."""

    _recorded_teachers_dir: str | None = PrivateAttr(None)
    """The teachers' folder as the config file itself names it (its teachers_dir, else its output_dir), set by
    load_compare_config: the path that a pruned run's fingerprint records for its teacher."""

    @field_validator("single_task_steps", mode="before")
    @classmethod
    def _steps_per_task(cls, value: object) -> object:
        """A mapping's values are step counts: a bad one is named by its task."""
        if isinstance(value, dict):
            for task, steps in value.items():
                if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                    raise ValueError(f"single_task_steps.{task}: a positive number of steps, got {steps!r}")
        return value

    def run_folder(self, name: str) -> Path:
        """The folder of one run: output_dir/runs/NAME, or teachers_dir/runs/NAME for a dense run when teachers_dir
        is set (the one place this path is made)."""
        root = self.teachers_dir if self.teachers_dir and is_dense_run(name) else self.output_dir
        return Path(root) / "runs" / name

    def recorded_teacher_folder(self, name: str) -> Path:
        """A teacher's folder as the fingerprint of its students records it: under the config file's own teachers_dir
        or output_dir, so that the same recipe keeps its fingerprint when output_dir or teachers_dir are overridden
        (another disk, an absolute path); which teacher it is, is checked by the teacher's own fingerprint."""
        root = self._recorded_teachers_dir or self.teachers_dir or self.output_dir
        return Path(root) / "runs" / name


def is_dense_run(name: str) -> bool:
    """Whether a planned run's name is a dense run's (mt-dense, st-TASK-dense)."""
    return re.fullmatch(r"(mt|st-.+)-dense", name) is not None


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    cfg = load_yaml(path, CompareConfig, overrides)
    written = read_yaml(path)
    cfg._recorded_teachers_dir = str(written.get("teachers_dir") or written.get("output_dir")
                                     or CompareConfig.model_fields["output_dir"].default)
    unknown = [m for m in cfg.methods if m not in pruned_methods()]
    if unknown:
        raise ConfigError(f"{path}: methods: {unknown[0]!r} is not a pruning method ({', '.join(pruned_methods())})")
    for pattern in cfg.overrides_by_run:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{path}: {pattern!r} is not a regular expression ({err})") from None
    for b in [*cfg.budgets, *cfg.single_task_sizes]:
        if not 0 < b < 1:
            raise ConfigError(f"{path}: budgets and single_task_sizes are fractions in (0, 1), got {b}")
    stray = [b for b in cfg.spread_budgets if b not in cfg.budgets]
    if stray:
        raise ConfigError(f"{path}: spread_budgets: {stray[0]} is not one of budgets {cfg.budgets}")
    if isinstance(cfg.single_task_steps, int) and cfg.single_task_steps <= 0:
        raise ConfigError(f"{path}: single_task_steps: a positive number of steps, a mapping task -> steps or "
                          f"match_exposure, got {cfg.single_task_steps}")
    if cfg.member_seeds and cfg.member_seeds_budget not in cfg.budgets:
        raise ConfigError(f"{path}: member_seeds_budget: {cfg.member_seeds_budget} is not one of budgets {cfg.budgets}")
    stray = [m for m in cfg.start_from_pretrained if m not in cfg.methods]
    if stray:
        raise ConfigError(f"{path}: start_from_pretrained: {stray[0]!r} is not one of methods {cfg.methods}")
    if cfg.start_from_pretrained and not cfg.teachers:
        raise ConfigError(f"{path}: start_from_pretrained needs teachers: true (without teachers every run starts "
                          "from the pretrained encoder)")
    if cfg.teachers and not cfg.dense_baselines:
        raise ConfigError(f"{path}: teachers: true needs dense_baselines: true (the dense runs are the teachers)")
    return cfg

"""The search config: the base experiment, the search space over its dotted keys, and the objective."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from mtp.config import ConfigError, ExperimentConfig, load_config
from mtp.run_folder import RunResults
from mtp.schema import Strict, load_yaml, resolve_path

# what a trial that ends over its budget (or fails to report) scores: it can never win
OVER_BUDGET = -1.0e9
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint", "quniform")


class SearchConfig(Strict):
    algorithm: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    num_samples: int = Field(4, gt=0)
    """Trials to draw (random/optuna/hyperopt); with grid, each grid point is repeated this many times."""
    seed: int = 0


class SchedulerConfig(Strict):
    name: Literal["fifo", "asha"] = "asha"
    grace_period: int = Field(1, gt=0)
    """ASHA: evaluations a trial gets before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(Strict):
    base: str
    """The trainer YAML every trial starts from (the same file `launch.sh --config` takes)."""
    overrides: list[str] = Field(default_factory=list)
    """Dotted overrides applied to every trial."""
    space: dict[str, dict[str, Any]]
    """dotted.key -> {uniform|loguniform|quniform: [low, high(, q)]} | {choice|grid: [values]} | {randint: [lo, hi]}"""
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    evaluations: int = Field(4, gt=0)
    """Dev evaluations per trial (intermediate results for the scheduler); train.eval_every is set from it."""
    workers: int = Field(1, gt=0)
    """DeepSpeed ranks per trial (Ray Train workers)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    max_failures: int = Field(1, ge=0)
    """Retries of a crashed trial before it is reported as failed."""
    storage_path: str = "runs/tune"
    name: str = "search"
    export_onnx: bool = True
    """Whether the best trial's export (best_export/) includes onnx/encoder.onnx; its export takes the longest."""

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        if not self.space:
            raise ValueError("space: at least one searched key is needed")
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{uniform: [0.0, 0.3]}}")
            kind, args = next(iter(spec.items()))
            if kind in ("choice", "grid"):
                if not isinstance(args, list) or not args:
                    raise ValueError(f"space.{key}.{kind}: a non-empty list of values")
            elif (not isinstance(args, list) or len(args) not in (2, 3)
                  or not all(isinstance(a, int | float) for a in args) or args[0] >= args[1]):
                raise ValueError(f"space.{key}.{kind}: [low, high] with low < high")
            elif kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"space.{key}.loguniform: bounds must be positive")
        grid = [k for k, s in self.space.items() if "grid" in s]
        if self.search.algorithm == "grid" and len(grid) != len(self.space):
            raise ValueError("search.algorithm grid: every space entry must be a grid")
        if self.search.algorithm != "grid" and grid:
            raise ValueError(f"space.{grid[0]}: grid values need search.algorithm: grid (or use choice)")
        return self


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> TuneConfig:
    return load_yaml(path, TuneConfig, overrides)


def base_path(cfg: TuneConfig) -> Path:
    return resolve_path(cfg.base, "base")


def representative(spec: dict[str, Any]) -> Any:
    """A value inside the distribution (to check that a key is a valid override of the base config)."""
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return args[0]
    if kind == "randint":
        return int(args[0])
    if kind == "loguniform":
        return math.sqrt(args[0] * args[1])
    return (args[0] + args[1]) / 2


def trial_overrides(cfg: TuneConfig, params: dict[str, Any], output_dir: str) -> list[str]:
    """The trainer overrides of one trial: fixed ones, the sampled values, evaluation cadence, output dir."""
    values = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
              for key, value in params.items()]
    return [*cfg.overrides, *values, f"output_dir={output_dir}"]


# the experiment's keys that may name a local file or folder
PATH_KEYS = ("encoder.name", "encoder.init_from", "distill.teacher", "data.glue_dir", "data.cache_dir",
             "train.deepspeed_config")


def absolute_if_local(value: str | None) -> str | None:
    """A relative path that exists from here, made absolute; None for anything else (a hub id, an absolute path)."""
    if not value:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else None


def with_absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """The search as the driver sees it, for trials that run in their own folders (and on other nodes): the base
    config's path and the experiment's local paths that exist relative to this directory, made absolute."""
    base = base_path(cfg)
    exp = load_config(base, list(cfg.overrides))
    extra = []
    for key in PATH_KEYS:
        section, field = key.split(".")
        if (absolute := absolute_if_local(getattr(getattr(exp, section), field))) is not None:
            extra.append(f"{key}={absolute}")
    for task in exp.tasks:
        for field in ("train_file", "dev_file"):
            if (absolute := absolute_if_local(getattr(task, field))) is not None:
                extra.append(f"tasks.{task.name}.{field}={absolute}")
    return cfg.model_copy(update={"base": str(base), "overrides": [*cfg.overrides, *extra]})


def experiment_for(cfg: TuneConfig, params: dict[str, Any], output_dir: str) -> ExperimentConfig:
    """The trainer config of one trial, with evaluations spread evenly over its steps."""
    exp = load_config(base_path(cfg), trial_overrides(cfg, params, output_dir))
    if exp.train.max_steps is None:
        raise ConfigError(f"{cfg.base}: trials need train.max_steps (add it to overrides)")
    exp.train.eval_every = max(1, exp.train.max_steps // cfg.evaluations)
    exp.train.checkpoint_every = exp.train.eval_every
    return exp


def check_space(cfg: TuneConfig) -> ExperimentConfig:
    """Every searched key must be a valid override of the base experiment: one line naming it if not."""
    exp = None
    for key, spec in cfg.space.items():
        try:
            exp = experiment_for(cfg, {key: representative(spec)}, "/nonexistent")
        except ConfigError as err:
            raise ConfigError(f"space.{key}: {err}") from None
    assert exp is not None
    return exp


def objective(results: dict[str, Any]) -> float:
    """The mean dev score; a model over its budget (or without a final evaluation) cannot win."""
    if not results.get("finished") or "mean_score" not in results:
        return OVER_BUDGET
    if not RunResults.model_validate(results).within_budget:
        return OVER_BUDGET
    return float(results["mean_score"])

"""The search on Ray Tune: each trial is a Tune function trainable that runs a DeepSpeed job of N workers
through Ray Train's TorchTrainer (Ray Train V2); workers report every evaluation back to Tune."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from mtp.config import ConfigError, ExperimentConfig, dump_config
from mtp.hooks import Hook
from mtp.pruning import first_step_at_budget
from mtp.run_folder import RunResults, read_results_dict
from tune.space import OVER_BUDGET, TuneConfig, absolute_if_local, experiment_for, objective, with_absolute_paths

RUN_SUBDIR = "run"
ATTEMPTS = "attempts.log"


# ---------------------------------------------------------------- inside the Ray Train workers


class TuneReporter(Hook):
    """Reports intermediate evaluations to Tune (through Ray Train) so that schedulers can stop trials: those of a
    model at its budget (from `report_from` on), which trials of different schedules can be compared by."""

    name = "tune_reporter"

    def __init__(self, max_steps: int, report_from: int = 0):
        self.max_steps = max_steps
        self.report_from = report_from

    def on_evaluate(self, step: int, results: dict[str, Any]) -> None:
        if step >= self.max_steps or step < self.report_from:
            return  # mid-ramp; or the final evaluation, reported with the budget check after training
        import ray.train

        mean = sum(r["score"] for r in results.values()) / len(results)
        ray.train.report({"objective": mean, "mean_score": mean, "step": step, "final": False,
                          **{f"score/{k}": v["score"] for k, v in results.items()}})


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One DeepSpeed rank: Ray Train has started the process group; mtp's trainer joins it."""
    import ray.train

    from mtp.training import run_training  # the trainer (DeepSpeed) loads in the workers only

    exp = ExperimentConfig.model_validate(loop_config["experiment"])
    run_dir = Path(exp.output_dir)
    results = read_results_dict(run_dir)
    if not (results and results.get("finished")):  # else: it finished before the search was interrupted
        resume = (run_dir / "checkpoints" / "latest").exists()  # a retried trial continues where it stopped
        max_steps = exp.train.max_steps or 0
        reporter = TuneReporter(max_steps, first_step_at_budget(exp.pruning, max_steps))
        results = run_training(exp, resume=resume, extra_hooks=[reporter])
    record = RunResults.model_validate(results)
    # "final", never "done": Tune ends a trial that reports done=True at once, killing the TorchTrainer
    # before it releases its placement group (the CPUs/GPUs then stay reserved until the search ends)
    ray.train.report({"objective": objective(results), "mean_score": results.get("mean_score", OVER_BUDGET),
                      "step": record.steps, "final": True, "within_budget": record.within_budget,
                      "kept_blocks": record.kept_blocks,
                      **{f"score/{k}": v for k, v in record.task_scores().items()}})


# ---------------------------------------------------------------- the Tune trial


def trial(params: dict[str, Any], tune_config: dict[str, Any]) -> None:
    """A Tune function trainable: builds the trial's experiment and runs it as a TorchTrainer job."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TuneConfig.model_validate(tune_config)
    # the trial's folder in the storage path itself (not Ray's local staging copy): the run's checkpoints,
    # results and TensorBoard logs live there, so a retried or resumed trial continues from them
    trial_dir = experiment_path(cfg) / Path(ray.tune.get_context().get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    with (trial_dir / ATTEMPTS).open("a") as log:  # one line per start: retries after crashes show here
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} attempt\n")
    exp = experiment_for(cfg, params, str(trial_dir / RUN_SUBDIR))
    (trial_dir / "trial_config.yaml").write_text(dump_config(exp))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    for key in ("MTP_GLUE_DIR", "MTP_CACHE_DIR", "HF_HOME", "HF_DATASETS_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    # Ray Train's print patch ignores a swapped sys.stdout: the `datasets` fingerprinting (dill) would
    # print bytecode listings into the trial's log
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not cfg.use_gpu:
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, int(cfg.cpus_per_worker)))}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"experiment": exp.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=str(trial_dir), callbacks=[TuneReportCallback()],
                             worker_runtime_env={"env_vars": env}),
    )
    trainer.fit()


# ---------------------------------------------------------------- the search


def ray_space(cfg: TuneConfig) -> dict[str, Any]:
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
              "randint": tune.randint, "choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, spec in cfg.space.items():
        kind, args = next(iter(spec.items()))
        space[key] = makers[kind](args) if kind in ("choice", "grid") else makers[kind](*args)
    return space


def search_algorithm(cfg: TuneConfig) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    algo = cfg.search.algorithm
    if algo in ("random", "grid"):
        return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=cfg.max_concurrent_trials)
    try:
        if algo == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=cfg.search.seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=cfg.search.seed)
    except (ImportError, AssertionError):
        raise ConfigError(f"search.algorithm: {algo} needs the {algo} package (pip install {algo})") from None


def scheduler(cfg: TuneConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.evaluations + 1,
                         grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)


def experiment_path(cfg: TuneConfig) -> Path:
    return Path(cfg.storage_path).expanduser().resolve() / cfg.name


def run_search(cfg: TuneConfig, address: str | None = None, resume: bool = False) -> Any:
    """Start (or resume) the search on a local Ray or the cluster at `address`; returns Tune's ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback

    path = experiment_path(cfg)
    # absolute paths: trials run in other folders
    cfg = with_absolute_paths(cfg).model_copy(update={"storage_path": str(path.parent)})
    # the trial only waits for its TorchTrainer, whose workers hold the CPUs/GPUs: it reserves no CPU
    trainable = tune.with_resources(tune.with_parameters(trial, tune_config=cfg.model_dump(mode="json")),
                                    {"cpu": 0, "memory": 64 * 2**20})
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": {k: absolute_if_local(v) or v for k, v in os.environ.items()
                                           if k in ("MTP_GLUE_DIR", "MTP_CACHE_DIR", "HF_DATASETS_OFFLINE")}})
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume: no search to resume in {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True,
                                   param_space=ray_space(cfg))
    else:
        if path.exists() and tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"{path} holds a search already; pass --resume to continue it or change name")
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(cfg),
            tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=cfg.search.num_samples,
                                        search_alg=search_algorithm(cfg), scheduler=scheduler(cfg),
                                        # the built-in generator limits concurrency itself
                                        max_concurrent_trials=None if cfg.search.algorithm in ("random", "grid")
                                        else cfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(path.parent),
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      callbacks=[TBXLoggerCallback()], verbose=1),
        )
    return tuner.fit()


# ---------------------------------------------------------------- the summary


def finished_search(cfg: TuneConfig) -> Any:
    """The ResultGrid of a search on disk, read without starting Ray."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    path = experiment_path(cfg)
    if not (path / "tuner.pkl").is_file():
        raise ConfigError(f"--summary-only: no search in {path}")
    return ResultGrid(ExperimentAnalysis(str(path), default_metric="objective", default_mode="max"))


def summarize(cfg: TuneConfig, grid: Any) -> dict[str, Any]:
    """Sorted trial table, best config as a trainer YAML, best model exported; written next to the search."""
    path = experiment_path(cfg)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_dir = Path(result.path)
        final = read_results_dict(trial_dir / RUN_SUBDIR)
        rows.append({
            "trial": "_".join(trial_dir.name.split("_")[1:3]) or trial_dir.name,  # trial_<id>_<n>_<params>
            "params": {k: result.config.get(k) for k in cfg.space},
            "objective": objective(final) if final else metrics.get("objective", OVER_BUDGET),
            "finished": bool(final and final.get("finished")),
            "scores": {k: v["score"] for k, v in ((final or {}).get("tasks") or {}).items()}
            or {k.removeprefix("score/"): v for k, v in metrics.items() if k.startswith("score/")},
            "kept_blocks": RunResults.model_validate(final).kept_blocks if final and final.get("params") else None,
            "status": "error" if result.error else ("finished" if final and final.get("finished") else "stopped"),
            "attempts": _count_lines(trial_dir / ATTEMPTS),
            "step": (final or {}).get("steps") or metrics.get("step"),
            "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
            "run_dir": str(trial_dir / RUN_SUBDIR),
        })
    # finished trials first: an early-stopped trial's objective is an intermediate score, not one at the budget
    rows.sort(key=lambda r: (r["finished"], r["objective"]), reverse=True)
    summary: dict[str, Any] = {"experiment": str(path), "trials": rows}
    best = next((r for r in rows if r["finished"] and r["objective"] > OVER_BUDGET), None)
    if best is not None:
        best_cfg = experiment_for(cfg, best["params"], f"runs/{cfg.name}-best")
        best_cfg.train.eval_every = 0
        (path / "best_config.yaml").write_text(
            f"# best trial {best['trial']} of {path} (objective {best['objective']:.2f})\n" + dump_config(best_cfg))
        from mtp.export import export_run

        summary["best"] = {**best, "config": str(path / "best_config.yaml"),
                           "export": str(export_run(best["run_dir"], path / "best_export",
                                                  onnx=cfg.export_onnx))}
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    (path / "summary.md").write_text(render_table(summary, cfg))
    return summary


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def render_table(summary: dict[str, Any], cfg: TuneConfig) -> str:
    tasks = sorted({t for r in summary["trials"] for t in r["scores"]})
    keys = list(cfg.space)
    head = ("| trial | " + " | ".join(keys) + " | objective | " + " | ".join(tasks)
            + " | kept blocks | status | attempts |")
    lines = [head, "|" + "---|" * (len(keys) + len(tasks) + 5)]
    for r in summary["trials"]:
        params = " | ".join(_short(r["params"][k]) for k in keys)
        objective_cell = "over budget / none" if r["objective"] <= OVER_BUDGET else f"{r['objective']:.2f}"
        if not r["finished"] and r["objective"] > OVER_BUDGET:
            objective_cell = f"({objective_cell} at step {r['step']})"  # intermediate, before the budget
        scores = " | ".join(f"{r['scores'][t]:.1f}" if t in r["scores"] else "—" for t in tasks)
        kept = f"{r['kept_blocks']:,}" if r["kept_blocks"] else "—"
        lines.append(f"| {r['trial']} | {params} | {objective_cell} | {scores} | {kept} | {r['status']} "
                     f"| {r['attempts']} |")
    for r in summary["trials"]:
        if r["error"]:
            lines.append(f"\nTrial {r['trial']} failed after {r['attempts']} attempts: {r['error']}")
    if "best" in summary:
        lines += ["", f"Best config: `{summary['best']['config']}`; exported model: `{summary['best']['export']}`"]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

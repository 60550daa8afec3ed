"""`mtp compare`: one multitask-pruned encoder against the best ensemble of single-task pruned encoders.

For each method and budget B (a fraction of one encoder's block parameters) it trains the multitask
model pruned to B, and each task alone over a grid of sizes b; then it finds, per B, the allocation
(b_1..b_T) from the grid with sum of kept parameters <= B and the highest mean dev score, and the equal
split B/T. Every run is an ordinary `launch.sh` job with its own output dir: finished runs are reused,
stopped ones resumed, and several `mtp compare` processes (on several machines sharing the output dir)
split the runs between them through claim files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from mtp.config import PROJECT_ROOT, ConfigError, _format_validation_error, _Strict, load_config

Method = Literal["magnitude", "movement", "soft_movement", "rank"]


class CompareConfig(_Strict):
    base: str
    """The experiment YAML every run starts from (encoder, tasks, data, training recipe)."""
    overrides: list[str] = Field(default_factory=list)
    """Dotted overrides for every run."""
    methods: list[Method] = Field(default_factory=lambda: ["movement", "rank"])
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.25, 0.1])
    """Encoder budgets B, as fractions of one dense encoder's block parameters."""
    single_task_sizes: list[float] = Field(default_factory=list)
    """Grid of single-task sizes b; B/T for every B (and B itself for low-resource tasks) are always added."""
    dense_baselines: bool = True
    multitask_overrides: list[str] = Field(default_factory=list)
    single_task_overrides: list[str] = Field(default_factory=list)
    pruned_overrides: list[str] = Field(default_factory=list)
    """Extra overrides for every pruned run (schedule, distillation weights), after the two above; dense runs keep
    their recipe."""
    teachers: bool = False
    """Every pruned run starts from the dense run of its task set (mt-dense for the multitask model, st-TASK-dense for
    TASK alone: encoder.init_from) and distils from it (distill.teacher); dense runs are trained first."""
    overrides_by_run: dict[str, list[str]] = Field(default_factory=dict)
    """Extra overrides for the runs whose name matches a regular expression (e.g. '^st-.*-rank-'), after the others."""
    spread_seeds: list[int] = Field(default_factory=list)
    """Extra seeds (train.seed) of the multitask model at `spread_budgets`, for every method: the run-to-run spread
    that tells a difference between the multitask model and the ensembles from noise."""
    spread_budgets: list[float] = Field(default_factory=list)
    low_resource_tasks: list[str] = Field(default_factory=lambda: ["rte", "mrpc", "stsb"])
    output_dir: str = "runs/compare"
    results_dir: str | None = None
    """A light folder apart from output_dir: the report and every finished run's results (runs/NAME.json, without
    checkpoints or weights). A run found there with the same recipe counts as finished, so the comparison
    continues from this folder alone in another checkout or on another machine: commit it. Default: the report
    goes to output_dir."""
    nproc: int = Field(2, gt=0)
    """DeepSpeed ranks per run (launch.sh --nproc)."""
    launcher_args: list[str] = Field(default_factory=list)
    """Extra launch.sh arguments for every run (e.g. --hostfile FILE)."""


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    from mtp.config import _set_dotted, parse_overrides

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        cfg = CompareConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None
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
    if cfg.teachers and not cfg.dense_baselines:
        raise ConfigError(f"{path}: teachers: true needs dense_baselines: true (the dense runs are the teachers)")
    return cfg


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str  # "none" for dense
    size: float  # fraction of one encoder's blocks; 1.0 dense
    task: str | None  # None: multitask
    overrides: tuple[str, ...] = field(default=())
    teacher: str | None = None  # the dense run this one starts from and distils from


def _fmt(size: float) -> str:
    return f"{size:g}"


def plan_runs(cfg: CompareConfig, tasks: list[str]) -> list[RunSpec]:
    """Every run the comparison needs, multitask first."""
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
                runs.append(RunSpec(f"mt-{method}-{_fmt(b)}-seed{seed}", method, b, None, (*mt, f"train.seed={seed}")))
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
    planned = []
    for spec in runs:
        teacher = None
        if spec.method != "none":
            teacher = ("mt-dense" if spec.task is None else f"st-{spec.task}-dense") if cfg.teachers else None
            source = [] if teacher is None else [f"encoder.init_from={Path(cfg.output_dir) / 'runs' / teacher}",
                                                 f"distill.teacher={Path(cfg.output_dir) / 'runs' / teacher}"]
            spec = replace(spec, overrides=spec.overrides + tuple(cfg.pruned_overrides) + tuple(source))
        by_run = tuple(o for pattern, extra in cfg.overrides_by_run.items() if re.search(pattern, spec.name)
                       for o in extra)
        planned.append(replace(spec, overrides=spec.overrides + by_run, teacher=teacher))
    return planned


def has_weights(run_dir: Path) -> bool:
    """Whether a run folder holds a finished model that other runs can start from and distil from."""
    return is_finished(run_dir) and (run_dir / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------- running


def _claim(run_dir: Path) -> bool:
    """Take the run for this process (a claim file); a claim of a dead process on this host is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / ".claim"
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
            return True
        except FileExistsError:
            host, _, pid = claim.read_text().partition(":")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                claim.unlink(missing_ok=True)
                continue
            return False
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_finished(run_dir: Path) -> bool:
    path = run_dir / "results.json"
    return path.is_file() and json.loads(path.read_text()).get("finished", False)


def report_dir(cfg: CompareConfig) -> Path:
    """Where the report (and, with results_dir, the kept results of finished runs) is written."""
    return Path(cfg.results_dir or cfg.output_dir)


def run_overrides(spec: RunSpec, cfg: CompareConfig, base_path: Path) -> list[str]:
    """The dotted overrides of the base experiment that make this run (all but its output dir)."""
    args = [*cfg.overrides, *spec.overrides]
    if spec.method != "none":
        args += [f"pruning.method={spec.method}", f"pruning.budget={spec.size}"]
    if spec.task is not None:
        args.append(f"tasks={json.dumps([_task_entry(base_path, cfg, spec.task)])}")
    return args


def _fingerprint(exp: Any) -> str:
    from mtp.config import recipe_dump

    return hashlib.sha256(recipe_dump(exp).encode()).hexdigest()[:16]


def recipe_fingerprint(spec: RunSpec, cfg: CompareConfig, base_path: Path) -> str:
    """A hash of the run's whole resolved experiment config (output dir aside): a changed recipe changes it."""
    return _fingerprint(load_config(base_path, [*run_overrides(spec, cfg, base_path), "output_dir=."]))


def run_dir_recipe(run_dir: Path) -> str | None:
    """The fingerprint of the recipe a run folder was trained with: the .recipe file compare writes when it starts
    the run, else (folders from before that file) the config saved with its final model; None if neither."""
    from mtp.config import ExperimentConfig

    marker = run_dir / ".recipe"
    if marker.is_file():
        return marker.read_text().strip()
    meta = run_dir / "final" / "mtp.json"
    if meta.is_file():
        return _fingerprint(ExperimentConfig.model_validate({**json.loads(meta.read_text())["config"],
                                                             "output_dir": "."}))
    return None


def _current(run_dir: Path, spec: RunSpec, cfg: CompareConfig, base_path: Path) -> bool:
    """Whether a run folder holds this recipe's run (or one whose recipe it cannot tell)."""
    stored = run_dir_recipe(run_dir)
    return stored is None or stored == recipe_fingerprint(spec, cfg, base_path)


def set_aside_if_stale(cfg: CompareConfig, spec: RunSpec, base_path: Path) -> Path | None:
    """Move a run folder trained (or started) with another recipe to NAME.stale-FINGERPRINT, so that it is neither
    reused nor resumed; nothing is deleted. Returns the new place, or None if there was nothing to move."""
    run_dir = Path(cfg.output_dir) / "runs" / spec.name
    if not run_dir.is_dir() or (run_dir / ".claim").exists() or _current(run_dir, spec, cfg, base_path):
        return None  # a claimed folder is another process's to train (or a dead claim's, taken over below)
    stale = f"{spec.name}.stale-{run_dir_recipe(run_dir)}"
    target, n = run_dir.with_name(stale), 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{stale}-{n}")
    run_dir.rename(target)
    return target


def finished_results(cfg: CompareConfig, spec: RunSpec, base_path: Path) -> dict[str, Any] | None:
    """A finished run's results.json made by this recipe: from its run dir, else from the results folder (results
    whose recipe is unknown count as the same); None if not finished."""
    run_dir = Path(cfg.output_dir) / "runs" / spec.name
    if is_finished(run_dir) and _current(run_dir, spec, cfg, base_path):
        return json.loads((run_dir / "results.json").read_text())
    kept = report_dir(cfg) / "runs" / f"{spec.name}.json"
    if cfg.results_dir and kept.is_file():
        results = json.loads(kept.read_text())
        stored = results.get("recipe")
        if stored is None or stored == recipe_fingerprint(spec, cfg, base_path):
            return results
    return None


def keep_results(cfg: CompareConfig, spec: RunSpec, base_path: Path) -> None:
    """Copy a finished run's results.json into the results folder, with its recipe's fingerprint and this machine's
    data paths made portable (a GLUE folder becomes $MTP_GLUE_DIR/TASK)."""
    run_dir = Path(cfg.output_dir) / "runs" / spec.name
    if not cfg.results_dir or not is_finished(run_dir) or not _current(run_dir, spec, cfg, base_path):
        return
    results = json.loads((run_dir / "results.json").read_text())
    results["recipe"] = recipe_fingerprint(spec, cfg, base_path)
    glue = os.environ.get("MTP_GLUE_DIR")
    for entry in results.get("data", {}).values():
        source = Path(str(entry.get("source", "")))
        if source.is_absolute():
            inside = glue and source.resolve().is_relative_to(Path(glue).resolve())
            entry["source"] = f"$MTP_GLUE_DIR/{source.name}" if inside else f".../{source.name}"
    target = report_dir(cfg) / "runs" / f"{spec.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")


def launch_command(spec: RunSpec, cfg: CompareConfig, base_path: Path, out_root: Path, port: int) -> list[str]:
    """The launch.sh command that trains one run (resuming it if it has checkpoints)."""
    run_dir = out_root / "runs" / spec.name
    args = ["bash", str(PROJECT_ROOT / "launch.sh"), "--nproc", str(cfg.nproc), "--master_port", str(port),
            *cfg.launcher_args, "--config", str(base_path)]
    if (run_dir / "checkpoints" / "latest").exists():
        args.append("--resume")
    return [*args, *run_overrides(spec, cfg, base_path), f"output_dir={run_dir}"]


def start_run(spec: RunSpec, cfg: CompareConfig, base_path: Path, out_root: Path, port: int,
              parallel: int = 1) -> subprocess.Popen:
    """Start one run through launch.sh; runs side by side share the cores (one OpenMP pool per rank)."""
    run_dir = out_root / "runs" / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".recipe").write_text(recipe_fingerprint(spec, cfg, base_path) + "\n")
    args = launch_command(spec, cfg, base_path, out_root, port)
    log = (run_dir / "launch.log").open("a")
    log.write(f"\n$ {' '.join(args)}\n")
    log.flush()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * cfg.nproc))))
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env)


def _task_entry(base_path: Path, cfg: CompareConfig, task: str) -> dict[str, Any]:
    """The base experiment's entry for `task` (keeps its subsampling, weight and custom-file settings)."""
    exp = load_config(base_path, list(cfg.overrides))
    for entry in exp.tasks:
        if entry.name == task:
            return entry.model_dump(exclude_defaults=True)
    raise ConfigError(f"compare: task {task!r} is not in {base_path}")


def run_all(cfg: CompareConfig, base_path: Path, parallel: int = 1, only: str | None = None,
            log: Any = print) -> dict[str, str]:
    """Run every planned run not yet finished (claimed one by one); returns name -> status."""
    exp = load_config(base_path, list(cfg.overrides))
    tasks = [t.name for t in exp.tasks]
    out_root = Path(cfg.output_dir)
    plan = [s for s in plan_runs(cfg, tasks) if only is None or re.search(only, s.name)]
    status: dict[str, str] = {}
    pending = []
    for spec in plan:
        moved = set_aside_if_stale(cfg, spec, base_path)
        if moved is not None:
            log(f"compare: {spec.name}: its run folder holds another recipe; moved to {moved}")
        if finished_results(cfg, spec, base_path) is not None:
            keep_results(cfg, spec, base_path)
            status[spec.name] = "reused"
        else:
            pending.append(spec)
    by_name = {s.name: s for s in plan_runs(cfg, tasks)}
    for spec in list(pending):  # a teacher whose weights are gone (results kept, folder not) is trained again
        teacher = by_name.get(spec.teacher or "")
        if teacher and teacher not in pending and not has_weights(out_root / "runs" / teacher.name):
            log(f"compare: {teacher.name} is trained again: {spec.name} starts from its weights")
            pending.insert(0, teacher)
            status.pop(teacher.name, None)
    log(f"compare: {len(plan)} runs, {len(plan) - len(pending)} already finished, {len(pending)} to train")
    active: list[tuple[RunSpec, subprocess.Popen]] = []
    base_port = 29600 + os.getpid() % 1000
    slot = 0
    while pending or active:
        while pending and len(active) < parallel:
            ready = [s for s in pending if s.teacher is None or has_weights(out_root / "runs" / s.teacher)]
            waiting_on = {s.teacher for s in pending} - {s.name for s in ready}
            if not ready:
                if active or any((out_root / "runs" / str(t) / ".claim").exists() for t in waiting_on):
                    break  # a teacher is being trained here or elsewhere
                for spec in pending:
                    status[spec.name] = f"not trained: its teacher {spec.teacher} did not finish"
                    log(f"compare: {spec.name}: {status[spec.name]}")
                pending.clear()
                break
            spec = ready[0]
            pending.remove(spec)
            if not _claim(out_root / "runs" / spec.name):
                status[spec.name] = "claimed elsewhere"
                continue
            if finished_results(cfg, spec, base_path) is not None:  # another process finished it meanwhile
                (out_root / "runs" / spec.name / ".claim").unlink(missing_ok=True)
                keep_results(cfg, spec, base_path)
                status[spec.name] = "reused"
                continue
            log(f"compare: training {spec.name}")
            active.append((spec, start_run(spec, cfg, base_path, out_root, base_port + 10 * (slot % 50), parallel)))
            slot += 1
        for item in list(active):
            spec, proc = item
            if proc.poll() is not None:
                active.remove(item)
                _finish(spec, proc.returncode, out_root / "runs" / spec.name, status, log)
                keep_results(cfg, spec, base_path)
        if active or pending:
            time.sleep(1)
    return status


def _finish(spec: RunSpec, code: int, run_dir: Path, status: dict[str, str], log: Any) -> None:
    (run_dir / ".claim").unlink(missing_ok=True)
    status[spec.name] = "trained" if code == 0 and is_finished(run_dir) else f"failed (exit {code})"
    log(f"compare: {spec.name}: {status[spec.name]}")


# ---------------------------------------------------------------- the allocation search


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


def brute_force_allocation(choices: list[list[Choice]], capacity: int) -> tuple[list[Choice], float] | None:
    """Reference for tests: try every allocation."""
    best = None
    for combo in product(*choices):
        if sum(c.size for c in combo) <= capacity:
            mean = sum(c.score for c in combo) / len(combo)
            if best is None or mean > best[1]:
                best = (list(combo), mean)
    return best


# ---------------------------------------------------------------- the report


def build_report(cfg: CompareConfig, base_path: Path) -> dict[str, Any]:
    """Every number of the comparison from the finished runs (missing runs are reported, not fatal)."""
    import math

    exp = load_config(base_path, list(cfg.overrides))
    tasks = [t.name for t in exp.tasks]
    out_root = Path(cfg.output_dir)
    plan = plan_runs(cfg, tasks)
    results = {s.name: finished_results(cfg, s, base_path) for s in plan}
    missing = sorted(name for name, r in results.items() if r is None)
    any_result = next((r for r in results.values() if r), None)
    if any_result is None:
        raise ConfigError(f"compare: no finished run under {out_root}/runs (or {report_dir(cfg)}/runs) yet")
    dense_blocks = any_result["params"]["encoder_blocks"]
    embeddings = any_result["params"]["embeddings"]

    def kept(r: dict[str, Any]) -> int:
        return r["pruning"]["kept_blocks"] if r.get("pruning") else r["params"]["encoder_blocks"]

    def task_score(r: dict[str, Any] | None, task: str) -> float | None:
        return None if r is None else r["tasks"][task]["score"]

    report: dict[str, Any] = {"tasks": tasks, "dense_blocks": dense_blocks, "embeddings_per_encoder": embeddings,
                              "methods": {}, "missing_runs": missing, "dense": {}, "low_resource": [], "spread": []}
    dense_mt = results.get("mt-dense")
    if cfg.dense_baselines:
        mt = results.get("mt-dense")
        st = [results.get(f"st-{t}-dense") for t in tasks]
        report["dense"] = {
            "multitask": None if mt is None else {"scores": {t: task_score(mt, t) for t in tasks},
                                                  "mean": mt["mean_score"], "kept_blocks": kept(mt)},
            "single_task": None if any(r is None for r in st) else {
                "scores": {t: task_score(r, t) for t, r in zip(tasks, st, strict=True)},
                "mean": sum(task_score(r, t) for t, r in zip(tasks, st, strict=True)) / len(tasks),
                "kept_blocks": sum(kept(r) for r in st)}}
    for method in cfg.methods:
        rows = []
        for budget in cfg.budgets:
            capacity = int(math.floor(budget * dense_blocks))
            mt = results.get(f"mt-{method}-{_fmt(budget)}")
            choices = []
            for t in tasks:
                opts = []
                for spec in plan:
                    r = results.get(spec.name)
                    if spec.task == t and spec.method == method and r is not None:
                        opts.append(Choice(kept(r), task_score(r, t), _fmt(spec.size)))
                choices.append(opts)
            best = best_allocation(choices, capacity)
            equal_runs = [results.get(f"st-{t}-{method}-{_fmt(round(budget / len(tasks), 6))}") for t in tasks]
            equal = None if any(r is None for r in equal_runs) else {
                "size_each": budget / len(tasks),
                "scores": {t: task_score(r, t) for t, r in zip(tasks, equal_runs, strict=True)},
                "kept_blocks": sum(kept(r) for r in equal_runs)}
            if equal:
                equal["mean"] = sum(equal["scores"].values()) / len(tasks)
            rows.append({
                "budget": budget, "capacity": capacity,
                "tasks_without_single_task_runs": [t for t, opts in zip(tasks, choices, strict=True) if not opts],
                "multitask": None if mt is None else {
                    "scores": {t: task_score(mt, t) for t in tasks}, "mean": mt["mean_score"], "kept_blocks": kept(mt),
                    "retained": None if dense_mt is None else mt["mean_score"] / dense_mt["mean_score"]},
                "best_ensemble": None if best is None else {
                    "allocation": {t: c.label for t, c in zip(tasks, best[0], strict=True)},
                    "scores": {t: c.score for t, c in zip(tasks, best[0], strict=True)},
                    "mean": best[1], "kept_blocks": sum(c.size for c in best[0])},
                "equal_split": equal,
            })
            for t in cfg.low_resource_tasks:
                if t not in tasks:
                    continue
                alone = results.get(f"st-{t}-{method}-{_fmt(budget)}")
                report["low_resource"].append({"task": t, "method": method, "size": budget,
                                               "alone": task_score(alone, t), "multitask": task_score(mt, t)})
        report["methods"][method] = rows
        for budget in cfg.spread_budgets:
            names = [f"mt-{method}-{_fmt(budget)}", *(f"mt-{method}-{_fmt(budget)}-seed{s}" for s in cfg.spread_seeds)]
            means = [results[n]["mean_score"] for n in names if results.get(n) is not None]
            report["spread"].append({
                "method": method, "budget": budget, "runs": len(means), "means": means,
                "mean": statistics.fmean(means) if means else None,
                "stdev": statistics.stdev(means) if len(means) > 1 else None,
                "range": max(means) - min(means) if means else None})
    return report


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def render_markdown(report: dict[str, Any], cfg: CompareConfig, command: str) -> str:
    tasks = report["tasks"]
    lines = ["# Multitask pruning vs the best single-task ensemble", "",
             f"Reproduce: `{command}`", "",
             f"Encoder blocks (dense): {report['dense_blocks']:,} parameters; "
             f"embeddings {report['embeddings_per_encoder']:,} per encoder (the multitask model carries one table, "
             "an ensemble of T models carries T).", ""]
    header = "| budget | model | " + " | ".join(tasks) + " | mean | kept blocks | allocation |"
    sep = "|" + "---|" * (len(tasks) + 5)
    dense = report.get("dense") or {}
    if dense:
        lines += ["## Dense baselines", "", header, sep]
        for name, entry in (("multitask", dense.get("multitask")), ("single-task models", dense.get("single_task"))):
            if entry:
                lines.append(f"| 1.0 | {name} | " + " | ".join(_cell(entry["scores"][t]) for t in tasks)
                             + f" | **{entry['mean']:.2f}** | {entry['kept_blocks']:,} | |")
        lines.append("")
    for method, rows in report["methods"].items():
        lines += [f"## {method}", "", header, sep]
        for row in rows:
            for name, key in (("multitask", "multitask"), ("best ensemble", "best_ensemble"),
                              ("equal split", "equal_split")):
                entry = row[key]
                if entry is None:
                    note = "runs missing"
                    if key == "best_ensemble":
                        lacking = row["tasks_without_single_task_runs"]
                        note = f"no finished run of {', '.join(lacking)} yet" if lacking else "no allocation fits"
                    lines.append(f"| {row['budget']:g} | {name} | " + " | ".join("—" for _ in tasks)
                                 + f" | — | | {note} |")
                    continue
                alloc = ", ".join(f"{t} {b}" for t, b in entry.get("allocation", {}).items())
                if key == "equal_split":
                    alloc = f"{entry['size_each']:.3g} each"
                if entry.get("retained") is not None:
                    alloc = f"{entry['retained']:.3f} of the dense multitask mean"
                lines.append(f"| {row['budget']:g} | {name} | " + " | ".join(_cell(entry["scores"][t]) for t in tasks)
                             + f" | **{entry['mean']:.2f}** | {entry['kept_blocks']:,} | {alloc} |")
        lines.append("")
    if report["low_resource"]:
        lines += ["## Low-resource tasks: pruned alone vs pruned jointly, same size", "",
                  "| task | method | size | alone | in the multitask model | difference |", "|---|---|---|---|---|---|"]
        for r in report["low_resource"]:
            diff = None if r["alone"] is None or r["multitask"] is None else r["multitask"] - r["alone"]
            lines.append(f"| {r['task']} | {r['method']} | {r['size']:g} | {_cell(r['alone'])} | "
                         f"{_cell(r['multitask'])} | {'—' if diff is None else f'{diff:+.1f}'} |")
        lines.append("")
    if report.get("spread"):
        lines += ["## Run-to-run spread of the multitask model (seeds)", "",
                  "| method | budget | runs | mean scores | mean | stdev | range |", "|---|---|---|---|---|---|---|"]
        for r in report["spread"]:
            lines.append(f"| {r['method']} | {r['budget']:g} | {r['runs']} | "
                         + ", ".join(f"{m:.2f}" for m in r["means"])
                         + f" | {_cell(r['mean'])} | {_cell(r['stdev'])} | {_cell(r['range'])} |")
        lines.append("")
    if report["missing_runs"]:
        lines += [f"Runs not finished yet: {', '.join(report['missing_runs'])}", ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        rows = report["methods"][method]
        for key, label, style in (("multitask", "multitask", "o-"), ("best_ensemble", "best ensemble", "s--"),
                                  ("equal_split", "equal split", "^:")):
            pts = [(r["budget"], r[key]["mean"]) for r in rows if r[key] is not None]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, style, label=label)
        dense = (report.get("dense") or {}).get("multitask")
        if dense:
            ax.axhline(dense["mean"], color="grey", lw=0.8, ls="-.", label="dense multitask")
        ax.set_xscale("log")
        ax.set_xlabel("encoder budget B (fraction of dense blocks)")
        ax.set_ylabel("mean dev score")
        ax.set_title(method)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cfg: CompareConfig, base_path: Path, command: str) -> Path:
    """report.md, report.json, mean_vs_budget.png and a TensorBoard summary in the report dir."""
    from torch.utils.tensorboard import SummaryWriter

    report = build_report(cfg, base_path)
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report, cfg, command))
    plot_report(report, out / "mean_vs_budget.png")
    writer = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard" / "summary"))
    for method, rows in report["methods"].items():
        for row in rows:
            step = int(round(row["budget"] * 1000))
            for key in ("multitask", "best_ensemble", "equal_split"):
                if row[key] is not None:
                    writer.add_scalar(f"compare/{method}/{key}_mean", row[key]["mean"], step)
    writer.add_text("report", (out / "report.md").read_text())
    writer.close()
    return out / "report.md"

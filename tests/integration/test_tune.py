"""Ray Tune search: the space and objective, one-line config errors, and a real 2-trial search with resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mtp.config import ConfigError, load_config
from tests.conftest import ROOT
from tune.space import (
    OVER_BUDGET,
    TuneConfig,
    check_space,
    experiment_for,
    load_tune_config,
    objective,
    with_absolute_paths,
)

TINY_SEARCH = ROOT / "tune" / "configs" / "tiny.yaml"
# one local Ray cluster at a time: the searches here run on one xdist worker
pytestmark = pytest.mark.xdist_group("ray")


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


BASE = {"base": "configs/tiny.yaml", "overrides": ["train.max_steps=8", "pruning.method=movement",
                                                   "pruning.budget=0.3"]}


@pytest.mark.parametrize(
    ("space", "extra", "expected"),
    [
        ({}, {}, "at least one searched key"),
        ({"train.lr": {"gaussian": [0, 1]}}, {}, "space.train.lr: give one of uniform"),
        ({"train.lr": {"uniform": [0.3, 0.1]}}, {}, "space.train.lr.uniform: [low, high] with low < high"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, {}, "space.train.lr.loguniform: bounds must be positive"),
        ({"train.lr": {"choice": []}}, {}, "space.train.lr.choice: a non-empty list"),
        ({"train.lr": {"grid": [1e-4, 2e-4]}}, {}, "space.train.lr: grid values need search.algorithm: grid"),
        ({"train.lr": {"choice": [1e-4]}}, {"search": {"algorithm": "grid"}}, "every space entry must be a grid"),
        ({"train.lr": {"choice": [1e-4]}}, {"search": {"algorithm": "bayes"}}, "search.algorithm"),
        ({"train.lr": {"choice": [1e-4]}}, {"workers": 0}, "workers: Input should be greater than 0"),
    ],
)
def test_bad_search_configs_are_one_line_errors(tmp_path: Path, space: dict, extra: dict, expected: str) -> None:
    path = write(tmp_path, {**BASE, "space": space, **extra})
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "space.train.lrr: "),
        ({"tasks.qqp.weight": {"uniform": [0.5, 2.0]}}, "space.tasks.qqp.weight: "),
        ({"pruning.warmup_ratio": {"uniform": [-0.5, -0.1]}}, "space.pruning.warmup_ratio: "),
    ],
)
def test_searched_keys_must_be_valid_trainer_overrides(tmp_path: Path, space: dict, expected: str) -> None:
    cfg = load_tune_config(write(tmp_path, {**BASE, "space": space}))
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        check_space(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "tune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_configs_are_valid(path: Path) -> None:
    cfg = load_tune_config(path)
    exp = check_space(cfg)
    assert exp.pruning.method != "none" and exp.train.max_steps


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "space": {"train.lrr": {"uniform": [0.1, 0.2]}}})
    proc = subprocess.run([sys.executable, "-m", "tune", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tune: error: space.train.lrr") and len(proc.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, "-m", "mtp", "tune", "--config", str(tmp_path / "nope.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_trial_experiment_carries_sampled_values_and_evaluations() -> None:
    cfg = load_tune_config(TINY_SEARCH)
    params = {"pruning.warmup_ratio": 0.2, "pruning.score_lr": 0.05, "tasks.stsb.weight": 1.5,
              "sampling.probabilities": {"rte": 0.25, "stsb": 0.75}}
    exp = experiment_for(cfg, params, "/tmp/x")
    assert exp.pruning.warmup_ratio == 0.2 and exp.pruning.score_lr == 0.05
    assert [t.weight for t in exp.tasks] == [1.0, 1.5]
    assert exp.sampling.probabilities == {"rte": 0.25, "stsb": 0.75}
    assert exp.pruning.method == "movement" and exp.pruning.budget == 0.3
    assert exp.train.eval_every == exp.train.max_steps // cfg.evaluations == 4
    assert exp.output_dir == "/tmp/x"


def test_structured_pruning_keys_are_searchable(tmp_path: Path) -> None:
    """The structured method's own keys (its criterion, the Taylor average's decay, the heads' share) are points of a
    search space."""
    tree = {"base": "configs/tiny.yaml", "overrides": ["train.max_steps=8", "pruning.method=structured",
                                                      "pruning.budget=0.3"],
            "space": {"pruning.taylor_decay": {"uniform": [0.9, 0.999]},
                      "pruning.criterion": {"choice": ["taylor", "magnitude"]},
                      "pruning.attention_share": {"uniform": [0.1, 0.5]}}}
    cfg = load_tune_config(write(tmp_path, tree))
    assert check_space(cfg).pruning.method == "structured"
    exp = experiment_for(cfg, {"pruning.taylor_decay": 0.95, "pruning.criterion": "magnitude",
                               "pruning.attention_share": 0.25}, "/tmp/x")
    assert exp.pruning.taylor_decay == 0.95 and exp.pruning.criterion == "magnitude"
    assert exp.pruning.attention_share == 0.25


def test_trials_get_the_local_paths_the_driver_sees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial runs in its own folder (Ray moves it there): a teacher named relative to where the search was started
    must reach it as an absolute path; a path that does not exist from there is left to the trainer's lookup."""
    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_tune_config(write(tmp_path, {**BASE, "overrides": [*BASE["overrides"], "distill.teacher=teacher",
                                                                   "train.deepspeed_config=ds_configs/cpu_zero0.json"],
                                            "space": {"train.lr": {"uniform": [1e-4, 2e-4]}}}))
    driver_side = with_absolute_paths(cfg)
    monkeypatch.chdir(ROOT / "tests")  # where a trial runs: another folder
    exp = experiment_for(driver_side, {"train.lr": 1e-4}, "/tmp/x")
    assert exp.distill.teacher == str(tmp_path.resolve() / "teacher")
    assert exp.train.deepspeed_config == "ds_configs/cpu_zero0.json"  # not found from tmp_path: unchanged
    assert Path(driver_side.base).is_absolute() and exp.train.max_steps == 8
    assert experiment_for(cfg, {"train.lr": 1e-4}, "/tmp/x").distill.teacher == "teacher"  # what a trial got before


def test_only_evaluations_at_the_budget_reach_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-ramp scores favour schedules that have pruned less so far: ASHA must not stop trials on them."""
    import ray.train

    from tune.search import TuneReporter

    reported = []
    monkeypatch.setattr(ray.train, "report", lambda metrics: reported.append((metrics["step"], metrics["objective"])))
    reporter = TuneReporter(100, report_from=70)
    for step in (25, 50, 75, 100):  # the last is reported after training, with the budget check
        reporter.on_evaluate(step, {"rte": {"score": 50.0}, "stsb": {"score": 70.0}})
    assert reported == [(75, 60.0)]


def test_ray_space_samples_inside_the_declared_ranges() -> None:
    from ray.tune.search.sample import Domain

    from tune.search import ray_space

    cfg = TuneConfig.model_validate({**BASE, "space": {
        "train.lr": {"loguniform": [1e-5, 1e-3]}, "pruning.warmup_ratio": {"uniform": [0.0, 0.3]},
        "sampling.temperature": {"choice": [1.0, 2.0]}, "train.seed": {"randint": [0, 5]},
        "pruning.cooldown_ratio": {"quniform": [0.0, 0.2, 0.05]}}})
    space = ray_space(cfg)
    for _ in range(50):
        draw = {k: v.sample() if isinstance(v, Domain) else v for k, v in space.items()}
        assert 1e-5 <= draw["train.lr"] <= 1e-3 and 0.0 <= draw["pruning.warmup_ratio"] <= 0.3
        assert draw["sampling.temperature"] in (1.0, 2.0) and 0 <= draw["train.seed"] < 5
        assert round(draw["pruning.cooldown_ratio"] / 0.05, 6).is_integer()


@pytest.mark.parametrize("algorithm", ["random", "grid", "optuna"])
def test_search_algorithms_suggest_points_of_the_space(algorithm: str) -> None:
    from tune.search import ray_space, search_algorithm

    kind = "grid" if algorithm == "grid" else "choice"
    cfg = TuneConfig.model_validate({**BASE, "search": {"algorithm": algorithm},
                                     "space": {"sampling.temperature": {kind: [1.0, 5.0]}}})
    algo = search_algorithm(cfg)
    if algorithm == "optuna":
        algo.set_search_properties("objective", "max", ray_space(cfg))
        assert algo.suggest("t0")["sampling.temperature"] in (1.0, 5.0)
    else:
        assert type(algo).__name__ == "BasicVariantGenerator"
    hyperopt = TuneConfig.model_validate({**BASE, "search": {"algorithm": "hyperopt"},
                                          "space": {"train.lr": {"choice": [1e-4]}}})
    try:
        import hyperopt as _  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the hyperopt package"):
            search_algorithm(hyperopt)


def test_objective_is_the_mean_score_and_over_budget_cannot_win() -> None:
    done = {"finished": True, "mean_score": 71.5, "pruning": {"within_budget": True, "kept_blocks": 10}}
    assert objective(done) == 71.5
    assert objective({**done, "pruning": {"within_budget": False}}) == OVER_BUDGET
    assert objective({**done, "finished": False}) == OVER_BUDGET
    assert objective({"finished": True, "mean_score": 12.0}) == 12.0  # dense: no pruning report
    assert objective({"finished": True}) == OVER_BUDGET
    assert max([objective(done), objective({**done, "mean_score": 99.0, "pruning": {"within_budget": False}})]) == 71.5


def _trial_results(search_dir: Path) -> dict[str, dict]:
    out = {}
    for results in search_dir.glob("trial_*/run/results.json"):
        out[results.parent.parent.name] = json.loads(results.read_text())
    return out


@pytest.mark.slow
def test_two_trial_search_resumes_after_interruption_and_writes_the_summary(tmp_path: Path) -> None:
    storage = tmp_path / "tune"
    args = [sys.executable, "-m", "tune", "--config", str(TINY_SEARCH), f"storage_path={storage}", "name=t"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 1200  # generous: Ray starts slowly on a loaded 2-core machine
    while time.time() < deadline and first.poll() is None:
        if any(r.get("finished") for r in _trial_results(storage / "t").values()):
            break
        time.sleep(2)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    first.send_signal(signal.SIGINT)  # interrupt the search after its first trial finished
    first.wait(timeout=300)
    done_before = {name: r for name, r in _trial_results(storage / "t").items() if r.get("finished")}
    assert len(done_before) == 1
    (name, before), = done_before.items()
    mtime = (storage / "t" / name / "run" / "results.json").stat().st_mtime

    proc = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _trial_results(storage / "t")
    assert len(results) == 2 and all(r["finished"] for r in results.values())
    # the finished trial was not trained again
    assert (storage / "t" / name / "run" / "results.json").stat().st_mtime == mtime
    assert results[name]["wall_time_s"] == before["wall_time_s"]

    summary = json.loads((storage / "t" / "summary.json").read_text())
    objectives = [r["objective"] for r in summary["trials"]]
    assert len(objectives) == 2 and objectives == sorted(objectives, reverse=True)
    assert all(r["status"] == "finished" and set(r["scores"]) == {"rte", "stsb"} for r in summary["trials"])
    assert all(r["kept_blocks"] <= results[Path(r["run_dir"]).parent.name]["pruning"]["budget"]
               for r in summary["trials"])
    best = summary["best"]
    assert best["objective"] == objectives[0]
    best_cfg = load_config(best["config"])  # a ready-to-run trainer YAML with the best values
    for key, value in best["params"].items():
        section, field = key.split(".", 1)
        if section == "tasks":
            task, attr = field.split(".")
            assert getattr(next(t for t in best_cfg.tasks if t.name == task), attr) == pytest.approx(value)
        else:
            assert getattr(getattr(best_cfg, section), field) == pytest.approx(value)
    assert (Path(best["export"]) / "compact" / "model.safetensors").is_file()
    assert (Path(best["export"]) / "onnx" / "encoder.onnx").is_file()
    md = (storage / "t" / "summary.md").read_text()
    assert "| objective |" in md and "Best config" in md
    again = subprocess.run([*args, "--summary-only"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "| objective |" in again.stdout, again.stderr[-2000:]
    # TensorBoard: every trial has an HParams record and the trainer's own logs
    for trial in (storage / "t").glob("trial_*"):
        events = b"".join(p.read_bytes() for p in trial.glob("events.out.tfevents*"))
        assert b"_hparams_/session_start_info" in events
        assert any((trial / "run" / "tensorboard").iterdir())


@pytest.mark.slow
def test_a_crashing_trial_is_retried_reported_and_does_not_stop_the_search(tmp_path: Path) -> None:
    # a dropout probability of 7 passes the config schema but makes the model's construction raise in
    # the Ray Train worker: a real crash inside the trial, after Ray and the TorchTrainer started
    search = write(tmp_path, {**BASE, "space": {"encoder.config_overrides.hidden_dropout_prob": {"grid": [0.1, 7.0]}},
                              "search": {"algorithm": "grid", "num_samples": 1}, "scheduler": {"name": "fifo"},
                              "evaluations": 1, "max_failures": 1, "storage_path": str(tmp_path / "tune"),
                              "name": "crash", "export_onnx": False})
    proc = subprocess.run([sys.executable, "-m", "tune", "--config", str(search)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "tune" / "crash" / "summary.json").read_text())
    by_dropout = {r["params"]["encoder.config_overrides.hidden_dropout_prob"]: r for r in summary["trials"]}
    good, bad = by_dropout[0.1], by_dropout[7.0]
    assert good["status"] == "finished" and good["attempts"] == 1 and summary["best"]["trial"] == good["trial"]
    assert bad["status"] == "error" and bad["attempts"] == 2 and bad["objective"] == OVER_BUDGET  # 1 + 1 retry
    assert "dropout probability" in (tmp_path / "tune" / "crash" / bad["run_dir"].split("/")[-2] / "error.txt"
                                     ).read_text()
    assert f"Trial {bad['trial']} failed after 2 attempts" in (tmp_path / "tune" / "crash" / "summary.md").read_text()
    export = Path(summary["best"]["export"])  # export_onnx: false leaves the ONNX file out
    assert (export / "compact" / "model.safetensors").is_file() and not (export / "onnx").exists()
    assert "InferenceSession" not in (export / "README.md").read_text()  # the card offers no ONNX file it lacks


def test_a_search_whose_teacher_is_missing_exits_2_before_ray_starts(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "overrides": [*BASE["overrides"], f"distill.teacher={tmp_path / 'no-run'}",
                                                  "distill.logit_weight=0.0"],
                            "space": {"train.lr": {"uniform": [0.001, 0.002]}}})
    proc = subprocess.run([sys.executable, "-m", "tune", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("tune: error: distill.teacher: cannot load")

"""The comparison end to end: tiny `mtp compare` runs, reuse, stale recipes, teachers, the spread."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mtp.compare import ComparePlan, plan_runs
from mtp.config import ConfigError
from tests.conftest import ROOT


@pytest.mark.slow
def test_tiny_compare_end_to_end_and_reuse(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    kept = tmp_path / "kept"  # the light results folder a user commits
    # one budget (7 runs: three dense, the multitask model, rte at 0.25 and 0.5, stsb at 0.25); the report over
    # several budgets is checked on kept results below (test_a_best_ensemble_over_a_partial_grid_...)
    cmd = [sys.executable, "-m", "mtp", "compare", "--config", "configs/compare_tiny.yaml", "--parallel", "2",
           f"output_dir={out}", f"results_dir={kept}", "budgets=[0.5]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((kept / "report.json").read_text())
    assert report["missing_runs"] == []
    rows = report["methods"]["movement"]
    assert [r["budget"] for r in rows] == [0.5]
    for row in rows:
        assert row["multitask"]["kept_blocks"] <= row["capacity"] and row["tasks_without_single_task_runs"] == []
        assert row["equal_split"] is not None
        if row["best_ensemble"] is not None:
            assert row["best_ensemble"]["kept_blocks"] <= row["capacity"]
            assert row["best_ensemble"]["mean"] >= row["equal_split"]["mean"] - 1e-9
    assert report["dense"]["multitask"] and report["dense"]["single_task"]
    assert {(r["task"], r["size"]) for r in report["low_resource"]} == {("rte", 0.5)}
    md = (kept / "report.md").read_text()
    assert "| 0.5 | multitask |" in md and "best ensemble" in md and "Low-resource" in md
    assert (kept / "mean_vs_budget.png").stat().st_size > 1000
    assert any((out / "runs" / "st-rte-movement-0.25" / "tensorboard").iterdir())
    # every finished run's results are kept apart, without this machine's data paths
    names = {p.stem for p in (kept / "runs").glob("*.json")}
    assert names == {p.name for p in (out / "runs").iterdir()}
    source = json.loads((kept / "runs" / "mt-dense.json").read_text())["data"]["rte"]["source"]
    assert source == "$MTP_GLUE_DIR/RTE", source
    # a second call reuses every finished run and trains nothing
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to train" in again.stdout
    # the results folder alone (a fresh checkout: no run dirs, checkpoints or weights) continues the comparison
    shutil.rmtree(out)
    fresh = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and "0 to train" in fresh.stdout, fresh.stdout[-2000:] + fresh.stderr[-2000:]
    assert json.loads((kept / "report.json").read_text())["methods"] == report["methods"]
    # kept results carry their recipe: a changed single-task recipe is trained again, the multitask runs are reused
    from mtp.compare import finished_results, load_compare_config

    changed = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={out}", f"results_dir={kept}",
                                                                      "budgets=[0.5]",
                                                                      "single_task_overrides=[train.lr=0.002]"])
    plan = ComparePlan.build(changed, ROOT / changed.base)
    assert finished_results(plan, plan.by_name["mt-movement-0.5"]) is not None
    assert finished_results(plan, plan.by_name["st-rte-movement-0.25"]) is None


def test_compare_config_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("base: configs/tiny.yaml\nbudgets: [1.5]\n")
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "budgets and single_task_sizes are fractions" in proc.stderr
    bad.write_text("base: configs/tiny.yaml\nmethods: [prune_it]\n")
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "methods: 'prune_it' is not a pruning method (magnitude, movement" in proc.stderr
    bad.write_text("base: configs/tiny.yaml\nlow_resource_tasks: [rte, cola]\n")
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "low_resource_tasks: 'cola' is not a task of configs/tiny.yaml" in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("compare_*.yaml")), ids=lambda p: p.name)
def test_shipped_compare_configs_load_with_their_base(path: Path) -> None:
    from mtp.compare import load_compare_config
    from mtp.config import load_config

    cfg = load_compare_config(path)
    exp = load_config(ROOT / cfg.base, list(cfg.overrides))
    assert plan_runs(cfg, [t.name for t in exp.tasks])
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--config", "configs/compare_tiny.yaml",
                           "--only", "rank|("], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--only: 'rank|(' is not a regular expression" in proc.stderr


def test_only_selects_runs_by_regular_expression(tmp_path: Path) -> None:
    from mtp.compare import load_compare_config, run_all

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path}", "methods=[movement,rank]"])
    names = [s.name for s in plan_runs(cfg, ["rte", "stsb"])]
    wanted = [n for n in names if "rank" in n or n.endswith("dense")]
    assert len(wanted) < len(names) and any("movement" in n for n in names)
    for name in wanted:  # finished, so selecting them trains nothing
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps({"finished": True}))
    status = run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="rank|dense", log=lambda _: None)
    assert status == dict.fromkeys(wanted, "reused")


def test_overrides_by_run_reach_only_the_runs_they_name(tmp_path: Path) -> None:
    from mtp.compare import load_compare_config
    from mtp.config import ConfigError

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["methods=[movement,rank]", "overrides_by_run="
                                                                  "{'^st-.*-rank-': [pruning.gate_lr=0.2]}"])
    plan = plan_runs(cfg, ["rte", "stsb"])
    touched = {s.name for s in plan if "pruning.gate_lr=0.2" in s.overrides}
    assert touched == {s.name for s in plan if s.name.startswith("st-") and "-rank-" in s.name} and touched
    bad = tmp_path / "c.yaml"
    bad.write_text("base: configs/tiny.yaml\noverrides_by_run: {'st-(': [train.lr=0.1]}\n")
    with pytest.raises(ConfigError, match="is not a regular expression"):
        load_compare_config(bad)


def test_a_run_folder_from_another_recipe_is_set_aside_not_reused(tmp_path: Path) -> None:
    """Run folders are checked like kept results: one made by another recipe (its .recipe file, or the config saved
    with its final model) is neither reused nor resumed; it is moved aside, and nothing is deleted."""
    from mtp.compare import finished_results, load_compare_config, recipe_fingerprint, set_aside_if_stale

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path}"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    spec = plan.by_name["st-rte-movement-0.25"]
    run_dir = tmp_path / "runs" / spec.name
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"finished": True, "mean_score": 50.0}))
    (run_dir / ".recipe").write_text("0123456789abcdef\n")  # another recipe
    assert finished_results(plan, spec) is None
    moved = set_aside_if_stale(plan, spec)
    assert moved == tmp_path / "runs" / f"{spec.name}.stale-0123456789abcdef" and not run_dir.exists()
    assert json.loads((moved / "results.json").read_text())["mean_score"] == 50.0
    # a folder from before .recipe files: its recipe is read from the final model's config
    exp = plan.experiment(spec, [f"output_dir={run_dir}"])
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"finished": True, "mean_score": 60.0}))
    (run_dir / "final" / "mtp.json").write_text(json.dumps({"config": exp.model_dump(mode="json")}))
    assert finished_results(plan, spec)["mean_score"] == 60.0 and set_aside_if_stale(plan, spec) is None
    (run_dir / ".recipe").write_text(recipe_fingerprint(plan, spec))
    assert finished_results(plan, spec)["mean_score"] == 60.0
    changed = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path}",
                                                                      "single_task_overrides=[train.lr=0.002]"])
    changed_plan = ComparePlan.build(changed, ROOT / changed.base)
    changed_spec = changed_plan.by_name[spec.name]
    assert finished_results(changed_plan, changed_spec) is None
    old_recipe = recipe_fingerprint(plan, spec)
    assert set_aside_if_stale(changed_plan, changed_spec).name == f"{spec.name}.stale-{old_recipe}"


def test_a_run_finished_elsewhere_after_planning_is_not_trained_again(tmp_path: Path, monkeypatch) -> None:
    """Several processes (or machines) sharing output_dir plan every run at the start; one that another finished
    in the meantime is reused when its turn comes, not claimed and trained again."""
    import mtp.compare as compare
    from mtp.compare import runner

    cfg = compare.load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path}", "teachers=false"])
    claim = runner.claim

    def finished_by_another_process(run_dir: Path) -> bool:
        (run_dir.parent).mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"finished": True}))
        return claim(run_dir)

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "claim", finished_by_another_process)
    monkeypatch.setattr(runner, "start_run", no_training)
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^st-rte-", log=lambda _: None)
    assert status and set(status.values()) == {"reused"}
    assert not any((tmp_path / "runs").glob("*/.claim"))


def test_two_processes_of_one_host_never_both_take_over_a_dead_claim(tmp_path: Path, monkeypatch) -> None:
    """A claim left by a dead process is taken over by one process only, however the two interleave: each finds the
    holder dead (slowly, here), and without the claim lock the second would remove the first's new claim."""
    import threading
    import time as clock

    from mtp.compare import store

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".claim").write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    alive = store._alive
    delays = iter([0.1, 0.6])

    def slow_alive(pid: int) -> bool:  # both find the holder dead; the first takes the claim before the second acts
        clock.sleep(next(delays, 0.1))
        return alive(pid)

    monkeypatch.setattr(store, "_alive", slow_alive)
    taken: list[bool] = []
    threads = [threading.Thread(target=lambda: taken.append(store.claim(run_dir))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == [False, True]
    # where the file system has no locks, claims are taken as before (one warning), not refused
    import errno

    def no_locks(*_args) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    monkeypatch.setattr(store, "_UNLOCKED_WARNED", False)
    with pytest.warns(UserWarning, match="no file locks where the runs are"):
        assert store.claim(tmp_path / "another")


def test_pruned_runs_start_from_and_distil_from_their_dense_teacher(tmp_path: Path, monkeypatch) -> None:
    """With teachers, each pruned run names its dense run as init_from and distill.teacher and is started only once
    that run's weights exist; a teacher that fails leaves its students untrained, with the reason."""
    import mtp.compare as compare
    from mtp.compare import runner

    cfg = compare.load_compare_config(ROOT / "configs/compare_tiny.yaml",
                                      [f"output_dir={tmp_path}", f"results_dir={tmp_path / 'kept'}"])
    plan = {s.name: s for s in plan_runs(cfg, ["rte", "stsb"])}
    assert plan["mt-dense"].teacher is None and not any("distill" in o for o in plan["mt-dense"].overrides)
    assert plan["mt-movement-0.5"].teacher == "mt-dense"
    assert f"distill.teacher={tmp_path / 'runs' / 'mt-dense'}" in plan["mt-movement-0.5"].overrides
    assert f"encoder.init_from={tmp_path / 'runs' / 'st-rte-dense'}" in plan["st-rte-movement-0.25"].overrides
    started: list[str] = []

    def fake_start(_plan, spec, *_args, **_kwargs):
        started.append(spec.name)
        fails = spec.name == "st-stsb-dense"
        return ended_run(tmp_path / "runs" / spec.name, {"finished": not fails}, weights=not fails)

    monkeypatch.setattr(runner, "start_run", fake_start)
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), parallel=2, log=lambda _: None)
    for name, spec in plan.items():
        if spec.teacher and spec.teacher != "st-stsb-dense":
            assert started.index(spec.teacher) < started.index(name)
    assert not any(n.startswith("st-stsb-movement") for n in started)
    assert status["st-stsb-movement-0.25"] == "not trained: its teacher st-stsb-dense did not finish"
    # a student whose teacher's folder is gone (its results kept in results_dir, as on a new machine) trains the
    # teacher again first: the teacher's kept results do not count as its weights
    assert (tmp_path / "kept" / "runs" / "mt-dense.json").is_file()
    shutil.rmtree(tmp_path / "runs" / "mt-dense")
    shutil.rmtree(tmp_path / "runs" / "mt-movement-0.2")
    (tmp_path / "kept" / "runs" / "mt-movement-0.2.json").unlink()
    started.clear()
    lines: list[str] = []
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^mt-movement-0.2$", log=lines.append)
    assert started == ["mt-dense", "mt-movement-0.2"]
    assert status == {"mt-dense": "trained", "mt-movement-0.2": "trained"}
    assert "compare: 1 runs, 0 already finished, 1 to train (and 1 teacher again)" in lines
    # the faked runs' results hold no wall time: nothing to estimate from, and the log says so
    assert "compare: time left: unknown: 2 runs with no finished run of the same task, dense or pruned, to go by" \
        in lines
    # --only selecting dense runs alone trains a teacher again when its weights are gone (on a new machine, to give a
    # search or another comparison its weights); its kept results stay (the finished runs learned from them), and the
    # log gives both means; with its weights here it is reused
    kept_teacher = (tmp_path / "kept" / "runs" / "mt-dense.json").read_text()
    shutil.rmtree(tmp_path / "runs" / "mt-dense")
    started.clear()
    lines.clear()
    monkeypatch.setattr(runner, "start_run", lambda _plan, spec, *_a, **_k: (
        started.append(spec.name), ended_run(tmp_path / "runs" / spec.name, {"finished": True, "mean_score": 61.5}))[1])
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^mt-dense$", log=lines.append)
    assert started == ["mt-dense"] and status == {"mt-dense": "trained"}
    assert "compare: 1 runs, 1 already finished, 0 to train (and 1 teacher again)" in lines
    assert any(line.startswith("compare: mt-dense trained again for its weights: mean 61.50 here, unknown in its "
                               "kept results, which stay") for line in lines), lines
    assert (tmp_path / "kept" / "runs" / "mt-dense.json").read_text() == kept_teacher
    started.clear()
    assert compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^mt-dense$", log=lambda _: None) == \
        {"mt-dense": "reused"} and started == []
    # a selection with pruned runs trains no teacher whose students are all finished
    shutil.rmtree(tmp_path / "runs" / "mt-dense")
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^mt-", log=lambda _: None)
    assert started == [] and set(status.values()) == {"reused"}
    # a teacher's folder of another recipe is no teacher: it is moved aside and trained again before a student
    stale = tmp_path / "runs" / "mt-dense"
    ended_run(stale, {"finished": True})
    (stale / ".recipe").write_text("0123456789abcdef\n")
    shutil.rmtree(tmp_path / "runs" / "mt-movement-0.2")
    (tmp_path / "kept" / "runs" / "mt-movement-0.2.json").unlink()
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), only="^mt-movement-0.2$", log=lambda _: None)
    assert started == ["mt-dense", "mt-movement-0.2"]
    assert (tmp_path / "runs" / "mt-dense.stale-0123456789abcdef").is_dir()


def test_extra_seeds_give_the_multitask_spread_and_the_report_the_retained_fraction(tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"results_dir={kept}", "spread_seeds=[7, 8]", "spread_budgets=[0.5]"])
    plan = {s.name: s for s in plan_runs(cfg, ["rte", "stsb"])}
    assert "train.seed=7" in plan["mt-movement-0.5-seed7"].overrides and plan["mt-movement-0.5-seed7"].teacher
    assert "mt-movement-0.2-seed7" not in plan
    (kept / "runs").mkdir(parents=True)
    for name, mean in {"mt-dense": 80.0, "mt-movement-0.5": 70.0, "mt-movement-0.5-seed7": 72.0,
                       "mt-movement-0.5-seed8": 74.0}.items():
        (kept / "runs" / f"{name}.json").write_text(json.dumps({
            "finished": True, "mean_score": mean, "params": {"encoder_blocks": 1000, "embeddings": 10},
            "tasks": {"rte": {"score": mean}, "stsb": {"score": mean}},
            "pruning": None if name == "mt-dense" else {"kept_blocks": 500}}))
    report = build_report(ComparePlan.build(cfg, ROOT / cfg.base))
    assert report["spread"] == [{"method": "movement", "budget": 0.5, "runs": 3, "means": [70.0, 72.0, 74.0],
                                 "mean": 72.0, "stdev": 2.0, "range": 4.0}]
    assert report["methods"]["movement"][0]["multitask"]["retained"] == pytest.approx(70.0 / 80.0)
    md = render_markdown(report, cfg, "mtp compare")
    assert "| movement | 0.5 | 3 | 70.00, 72.00, 74.00 | 72.00 | 2.00 | 4.00 |" in md
    assert "0.875 of the dense multitask mean" in md
    with pytest.raises(ConfigError, match="spread_budgets: 0.3 is not one of budgets"):
        load_compare_config(ROOT / "configs/compare_tiny.yaml", ["spread_seeds=[7]", "spread_budgets=[0.3]"])


class EndedProcess:
    """What a faked `start_run` returns: a run process that has already exited."""

    returncode = 0

    def poll(self) -> int:
        return 0


def ended_run(run_dir: Path, results: dict, weights: bool = True) -> EndedProcess:
    """Write a run folder as its training would leave it (results.json, and final weights unless `weights` is
    false); returns the ended process a faked `start_run` gives back."""
    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    if weights:
        (run_dir / "final" / "model.safetensors").write_bytes(b"weights")
    return EndedProcess()


def write_kept_result(kept: Path, name: str, score: float, kept_blocks: int | None) -> None:
    """A finished run's results in a results_dir: both tasks at `score`, `kept_blocks` of 1,000 (None: dense)."""
    (kept / "runs" / f"{name}.json").write_text(json.dumps({
        "finished": True, "mean_score": score, "params": {"encoder_blocks": 1000, "embeddings": 10},
        "tasks": {"rte": {"score": score}, "stsb": {"score": score}},
        "pruning": None if kept_blocks is None else {"kept_blocks": kept_blocks}}))


def test_a_best_ensemble_over_a_partial_grid_is_marked_a_lower_bound(tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"results_dir={kept}", "single_task_sizes=[0.1, 0.25]"])
    compare_plan = ComparePlan.build(cfg, ROOT / cfg.base)
    single = [s for s in compare_plan.runs if s.task is not None and s.method == "movement"]
    (kept / "runs").mkdir(parents=True)

    def write(name: str, score: float, kept_blocks: int | None) -> None:
        write_kept_result(kept, name, score, kept_blocks)

    write("mt-dense", 80.0, None)
    # every single-task run but stsb at 0.25 and rte at 0.5 (which cannot join an ensemble at B = 0.5: stsb's
    # smallest run, 0.1, would not fit beside it)
    assert "st-rte-movement-0.5" in [s.name for s in single]
    for spec in single:
        if spec.name not in ("st-stsb-movement-0.25", "st-rte-movement-0.5"):
            write(spec.name, 50.0 + 10 * spec.size, int(spec.size * 1000))
    row = next(r for r in build_report(compare_plan)["methods"]["movement"] if r["budget"] == 0.5)
    best = row["best_ensemble"]
    assert best["allocation"] == {"rte": "0.25", "stsb": "0.1"}  # the best of the finished runs
    assert best["complete"] is False and best["unfinished_runs"] == ["st-stsb-movement-0.25"]
    md = render_markdown(build_report(ComparePlan.build(cfg, ROOT / cfg.base)), cfg, "mtp compare")
    assert "over a partial grid (1 single-task runs not finished): a lower bound" in md

    write("st-stsb-movement-0.25", 52.5, 250)
    report = build_report(compare_plan)
    row = next(r for r in report["methods"]["movement"] if r["budget"] == 0.5)
    assert row["best_ensemble"]["complete"] is True and row["best_ensemble"]["unfinished_runs"] == []
    assert row["best_ensemble"]["allocation"] == {"rte": "0.25", "stsb": "0.25"}
    # every budget has its row (the end-to-end run trains one budget), each within its own capacity
    assert [r["budget"] for r in report["methods"]["movement"]] == [0.5, 0.2]
    low = next(r for r in report["methods"]["movement"] if r["budget"] == 0.2)
    assert low["best_ensemble"]["allocation"] == {"rte": "0.1", "stsb": "0.1"}
    assert low["best_ensemble"]["kept_blocks"] <= low["capacity"]
    assert {(r["task"], r["size"]) for r in report["low_resource"]} >= {("rte", 0.5), ("rte", 0.2)}


def test_the_report_warns_of_runs_cut_to_size_and_shows_each_sides_exposure(tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"results_dir={kept}", "methods=[rank]"])
    (kept / "runs").mkdir(parents=True)

    def write(name: str, pruning: dict | None, batches: dict, sampling: dict | None = None) -> None:
        (kept / "runs" / f"{name}.json").write_text(json.dumps({
            "finished": True, "mean_score": 60.0, "params": {"encoder_blocks": 1000, "embeddings": 10},
            "tasks": {"rte": {"score": 60.0}, "stsb": {"score": 60.0}}, "pruning": pruning, "steps": 40,
            "batches_per_task": batches, "sampling": sampling or {}}))

    write("mt-rank-0.5", {"kept_blocks": 500, "expected_over_target": 1.02}, {"rte": 30, "stsb": 10})
    write("mt-rank-0.2", {"kept_blocks": 200, "expected_over_target": 0.44}, {"rte": 30, "stsb": 10})  # far below
    write("st-rte-rank-0.25", {"kept_blocks": 250, "expected_over_target": 1.5}, {"rte": 20})
    # results from before the count and the ratio key: both worked out from what they hold
    write("st-stsb-rank-0.25", {"kept_blocks": 250, "expected_fraction_at_end": 0.3, "budget_fraction": 0.25},
          {}, {"stsb": 1.0})
    report = build_report(ComparePlan.build(cfg, ROOT / cfg.base))
    checks = {r["run"]: r for r in report["size_at_fix"]}
    assert not checks["mt-rank-0.5"]["far"] and checks["st-rte-rank-0.25"]["far"] and checks["mt-rank-0.2"]["far"]
    assert checks["st-stsb-rank-0.25"]["expected_over_target"] == pytest.approx(1.2)
    exposure = {r["task"]: r for r in report["exposure"]}
    assert exposure["rte"]["ratio"] == pytest.approx(1.5) and exposure["rte"]["counted"]
    assert exposure["stsb"]["single_task_batches"] == pytest.approx(40.0) and not exposure["stsb"]["counted"]
    md = render_markdown(report, cfg, "mtp compare")
    assert "**Warning**: 3 runs ended outside 0.91-1.1x" in md and "st-rte-rank-0.25 1.50" in md
    assert "mt-rank-0.2 0.44" in md
    assert "| rte | 30 (mt-rank-0.5) | 20 (st-rte-rank-0.25) | 1.50 |" in md


def test_a_pruned_runs_fingerprint_keeps_its_teacher_by_the_config_files_folder_wherever_the_runs_go() -> None:
    """output_dir or teachers_dir given on the command line (another disk, an absolute path) move the teacher the
    run trains from, not its fingerprint: the kept results stay current; the kept value is the one the file names."""
    from mtp.compare import load_compare_config

    path = ROOT / "configs/compare_minilm_distill.yaml"
    kept = ComparePlan.build(load_compare_config(path), ROOT / "configs/default.yaml")
    spec = kept.by_name["st-mrpc-rank-0.02"]
    stored = json.loads((ROOT / "docs/results/compare_minilm_distill/runs/st-mrpc-rank-0.02.json").read_text())
    assert kept.fingerprint(spec) == stored["recipe"]
    for moved in (["output_dir=/elsewhere/compare"], ["teachers_dir=/teachers", "output_dir=/students"]):
        plan = ComparePlan.build(load_compare_config(path, moved), ROOT / "configs/default.yaml")
        teacher = plan.experiment(plan.by_name[spec.name]).distill.teacher
        assert teacher is not None and teacher.startswith("/") and teacher.endswith("runs/st-mrpc-dense")
        assert {s.name: plan.fingerprint(s) for s in plan.runs} == {s.name: kept.fingerprint(s) for s in kept.runs}
        # results kept before the teacher was named so (its path as this command places it) stay current too
        from mtp.compare.plan import recipe_hash

        before = recipe_hash(plan.experiment(plan.by_name[spec.name], ["output_dir=."]))
        assert before != kept.fingerprint(spec) and plan.matches(before, plan.by_name[spec.name])
        assert not plan.matches("0123456789abcdef", plan.by_name[spec.name])
    # a recipe change still changes it; a teacher named by the run's own overrides is part of the recipe
    other = ComparePlan.build(load_compare_config(path, ["output_dir=/o", "overrides_by_run={'^st-mrpc-rank-0.02$': "
                                                         "[distill.teacher=/another/teacher]}"]),
                              ROOT / "configs/default.yaml")
    assert other.fingerprint(other.by_name[spec.name]) != kept.fingerprint(spec)


def test_single_task_steps_set_the_pruned_single_task_runs_length_or_match_the_multitask_exposure() -> None:
    from mtp.compare import load_compare_config
    from mtp.data import load_tasks, task_probabilities

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps=5"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    steps = {s.name: plan.experiment(s).train.max_steps for s in plan.runs}
    assert steps["st-rte-movement-0.2"] == 5 and steps["st-stsb-movement-0.1"] == 5
    assert steps["st-rte-dense"] == steps["mt-movement-0.2"] == 8  # the teachers and the multitask side keep theirs
    fingerprints = {s.name: plan.fingerprint(s) for s in plan.runs}

    # per task: the task named runs that long (the same recipe as the number gives it), the others keep theirs
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps={stsb: 5}"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    assert plan.experiment(plan.by_name["st-stsb-movement-0.1"]).train.max_steps == 5
    assert plan.fingerprint(plan.by_name["st-stsb-movement-0.1"]) == fingerprints["st-stsb-movement-0.1"]
    unset = ComparePlan.build(load_compare_config(ROOT / "configs/compare_tiny.yaml"), ROOT / cfg.base)
    rte = "st-rte-movement-0.2"
    assert plan.fingerprint(plan.by_name[rte]) == unset.fingerprint(unset.by_name[rte])
    assert plan.experiment(plan.by_name[rte]).train.max_steps == 8
    with pytest.raises(ConfigError, match="single_task_steps: 'qnli' is not one of the tasks"):
        ComparePlan.build(load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps={qnli: 5}"]),
                          ROOT / cfg.base)
    with pytest.raises(ConfigError, match="single_task_steps.stsb: a positive number of steps, got 0"):
        load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps={stsb: 0}"])

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps=match_exposure",
                                                                   "multitask_overrides=[train.max_steps=40]"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    base = plan.experiment(plan.by_name["mt-movement-0.2"])
    probs = task_probabilities(base, {t.name: len(t.train_texts) for t in load_tasks(base)})
    for task in ("rte", "stsb"):  # 64 rows each, proportional sampling: 20 batches of each of the 40
        assert probs[task] == pytest.approx(0.5)
        assert plan.experiment(plan.by_name[f"st-{task}-movement-0.1"]).train.max_steps == 20
    with pytest.raises(ConfigError, match="single_task_steps: a positive number"):
        load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps=0"])
    # a pruned run made longer by overrides_by_run would make the matched steps wrong: refused, naming it
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["single_task_steps=match_exposure",
                                                                   'overrides_by_run={"^mt-movement-": '
                                                                   '["train.max_steps=80"]}'])
    with pytest.raises(ConfigError, match=r"'\^mt-movement-' sets train.max_steps of mt-movement-0\.\d"):
        ComparePlan.build(cfg, ROOT / cfg.base)
    for written in ("--train.max_steps=80", "sampling={strategy: uniform}", "tasks.rte.max_train_examples=8"):
        cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
            "single_task_steps=match_exposure", 'overrides_by_run={"^st-rte-": ["' + written + '"]}'])
        with pytest.raises(ConfigError, match="of st-rte-"):
            ComparePlan.build(cfg, ROOT / cfg.base)


def test_the_held_out_half_chooses_the_ensemble_on_one_half_and_scores_it_on_the_other(tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"results_dir={kept}", "budgets=[0.5]", "single_task_sizes=[0.1]"])
    (kept / "runs").mkdir(parents=True)

    def write(name: str, kept_blocks: int | None, halves: dict[str, list[float]]) -> None:
        (kept / "runs" / f"{name}.json").write_text(json.dumps({
            "finished": True, "mean_score": 60.0, "params": {"encoder_blocks": 1000, "embeddings": 10},
            "tasks": {t: {"score": sum(h) / 2, "halves": h} for t, h in halves.items()},
            "pruning": None if kept_blocks is None else {"kept_blocks": kept_blocks}}))

    write("mt-dense", None, {"rte": [70, 70], "stsb": [80, 80]})
    write("mt-movement-0.5", 500, {"rte": [60, 62], "stsb": [70, 74]})
    # rte at 0.25 wins on the first half by luck (its second half is poor); at 0.1 it is steady
    write("st-rte-movement-0.25", 250, {"rte": [66, 50]})
    write("st-rte-movement-0.1", 100, {"rte": [60, 60]})
    write("st-rte-movement-0.5", 500, {"rte": [70, 70]})
    write("st-stsb-movement-0.25", 250, {"stsb": [70, 70]})
    write("st-stsb-movement-0.1", 100, {"stsb": [60, 60]})
    report = build_report(ComparePlan.build(cfg, ROOT / cfg.base))
    held = report["methods"]["movement"][0]["held_out"]
    assert held["allocation"] == {"rte": "0.25", "stsb": "0.25"}
    assert held["ensemble_on_first_half"] == pytest.approx(68.0)
    assert held["ensemble_on_second_half"] == pytest.approx(60.0)
    assert held["multitask_on_second_half"] == pytest.approx(68.0) and held["margin_on_second_half"] == 8.0
    assert "| movement | 0.5 | rte 0.25, stsb 0.25 | 68.00 | 60.00 | 68.00 | +8.00 |" in render_markdown(
        report, cfg, "mtp compare")
    # a run from before the halves: no held-out figure
    (kept / "runs" / "st-stsb-movement-0.1.json").write_text(json.dumps({
        "finished": True, "mean_score": 60.0, "params": {"encoder_blocks": 1000, "embeddings": 10},
        "tasks": {"stsb": {"score": 60.0}}, "pruning": {"kept_blocks": 100}}))
    report = build_report(ComparePlan.build(cfg, ROOT / cfg.base))
    row = report["methods"]["movement"][0]
    assert row["held_out"] is None and row["runs_without_halves"] == ["st-stsb-movement-0.1"]
    assert ("No held-out margin where a candidate run's results predate the half scores (train those runs again to "
            "get it: `mtp compare ... --retrain REGEX` with their names): movement B = 0.5: st-stsb-movement-0.1."
            ) in render_markdown(report, cfg, "mtp compare")


def test_retrain_trains_finished_pruned_runs_again_once_and_keeps_their_earlier_results(
        tmp_path: Path, monkeypatch) -> None:
    """`--retrain REGEX`: the finished pruned runs it matches are trained again (results from before the half scores),
    their kept results and run folders moved to superseded/, nothing deleted; the same command again trains nothing
    (the new results stand); --plan says both; a pattern that matches no pruned run is one line, exit 2."""
    from mtp.compare import compare, describe_plan, load_compare_config, runner

    out, kept = tmp_path / "out", tmp_path / "kept"
    overrides = [f"output_dir={out}", f"results_dir={kept}", "teachers=false"]
    config = ROOT / "configs/compare_tiny.yaml"
    cfg = load_compare_config(config, overrides)
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    (kept / "runs").mkdir(parents=True)
    for spec in plan.runs:  # every run finished, without half scores, its folder gone (another machine)
        write_kept_result(kept, spec.name, 50.0, None if spec.method == "none" else int(spec.size * 1000))
        stored = json.loads((kept / "runs" / f"{spec.name}.json").read_text())
        (kept / "runs" / f"{spec.name}.json").write_text(json.dumps({**stored, "recipe": plan.fingerprint(spec)}))
    started: list[str] = []

    def fake_start(_plan, spec, *_args, **_kwargs):
        started.append(spec.name)
        (out / "runs" / spec.name / ".recipe").write_text(plan.fingerprint(spec) + "\n")
        return ended_run(out / "runs" / spec.name, {
            "finished": True, "mean_score": 61.0, "params": {"encoder_blocks": 1000, "embeddings": 10},
            "tasks": {t: {"score": 61.0, "halves": [60.0, 62.0]} for t in ("rte", "stsb")},
            "pruning": {"kept_blocks": int(spec.size * 1000)}})

    monkeypatch.setattr(runner, "start_run", fake_start)
    retrain = "^mt-movement-"
    lines = describe_plan(config, overrides, retrain=retrain).splitlines()
    assert lines[-2] == f"{len(plan.runs)} runs: {len(plan.runs) - 2} finished, 2 to train"
    assert lines[-1].startswith("time left: unknown: 2 runs")  # the kept results here hold no wall time
    assert f"to train again (--retrain: its results move to {kept / 'superseded'})" in lines[1]
    log: list[str] = []
    status = runner.run_all(plan, retrain=retrain, log=log.append)
    assert sorted(started) == ["mt-movement-0.2", "mt-movement-0.5"]
    assert {status[n] for n in started} == {"trained"} and status["mt-dense"] == "reused"
    assert f"compare: mt-movement-0.5 is trained again (--retrain): its earlier results moved to " \
           f"{kept / 'superseded' / 'mt-movement-0.5.json'}" in log
    earlier = json.loads((kept / "superseded" / "mt-movement-0.5.json").read_text())
    assert earlier["mean_score"] == 50.0 and "halves" not in earlier["tasks"]["rte"]
    assert json.loads((kept / "runs" / "mt-movement-0.5.json").read_text())["tasks"]["rte"]["halves"] == [60.0, 62.0]
    # the same command again: trained once already, nothing starts, its new results stand
    started.clear()
    rebuilt = ComparePlan.build(cfg, ROOT / cfg.base)
    status = runner.run_all(rebuilt, retrain=retrain, log=log.append)
    assert started == [] and status["mt-movement-0.5"] == "reused"
    assert describe_plan(config, overrides, retrain=retrain).splitlines()[-1] == f"{len(plan.runs)} runs: " \
        f"{len(plan.runs)} finished"
    # its second training's folder is set aside too when it is trained again after the superseded copy is removed
    (kept / "superseded" / "mt-movement-0.5.json").unlink()
    runner.run_all(ComparePlan.build(cfg, ROOT / cfg.base), retrain="^mt-movement-0.5$", log=log.append)
    assert started == ["mt-movement-0.5"] and (out / "superseded" / "mt-movement-0.5" / "results.json").is_file()
    # another process trains it again between this one's planning and its claim: reused, nothing moved twice
    (kept / "superseded" / "mt-movement-0.2.json").unlink()
    real_claim = runner.claim

    def claim_after_another_retrain(run_dir: Path) -> bool:
        if run_dir.name == "mt-movement-0.2":
            (kept / "superseded" / "mt-movement-0.2.json").write_text('{"mean_score": 61.0, "by": "the other"}')
            for results in (kept / "runs" / "mt-movement-0.2.json", run_dir / "results.json"):  # its new training
                results.write_text(json.dumps({**json.loads(results.read_text()), "mean_score": 70.0}))
        return real_claim(run_dir)

    monkeypatch.setattr(runner, "claim", claim_after_another_retrain)
    started.clear()
    status = runner.run_all(ComparePlan.build(cfg, ROOT / cfg.base), retrain="^mt-movement-0.2$", log=log.append)
    assert started == [] and status["mt-movement-0.2"] == "reused"
    assert json.loads((kept / "superseded" / "mt-movement-0.2.json").read_text())["by"] == "the other"
    assert json.loads((kept / "runs" / "mt-movement-0.2.json").read_text())["mean_score"] == 70.0
    with pytest.raises(ConfigError, match="--retrain trains runs again and --report-only trains nothing"):
        compare(config, overrides, retrain=retrain, report_only=True)
    # the report's command reproduces the runs the selection trained, not the whole grid
    reproduce = compare(config, overrides, only="^mt-movement-0.2$", report_only=True).read_text().splitlines()[2]
    assert reproduce.endswith("--only '^mt-movement-0.2$'`") and reproduce.startswith("Reproduce: `mtp compare")
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--plan", "--config", str(config), "--retrain",
                           "dense", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["mtp: error: --retrain: 'dense' matches no pruned run of the plan "
                                                "(dense runs are not trained again by it)"]


def test_start_from_pretrained_keeps_the_teacher_and_drops_its_weights_as_the_start() -> None:
    from mtp.compare import load_compare_config

    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", ["methods=[movement, magnitude]",
                                                                   "start_from_pretrained=[movement]"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    movement = plan.experiment(plan.by_name["mt-movement-0.5"])
    magnitude = plan.experiment(plan.by_name["mt-magnitude-0.5"])
    assert movement.encoder.init_from is None and movement.distill.teacher.endswith("mt-dense")
    assert magnitude.encoder.init_from.endswith("mt-dense") and magnitude.distill.teacher.endswith("mt-dense")
    for bad, message in ((["start_from_pretrained=[rank]"], "'rank' is not one of methods"),
                         (["start_from_pretrained=[movement]", "teachers=false"], "needs teachers: true")):
        with pytest.raises(ConfigError, match=message):
            load_compare_config(ROOT / "configs/compare_tiny.yaml", bad)


def test_teachers_dir_shares_another_comparisons_dense_runs_and_refuses_one_of_another_recipe(tmp_path: Path) -> None:
    from mtp.compare import load_compare_config, run_all

    shared = tmp_path / "first"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path / 'study'}",
                                                                   f"teachers_dir={shared}"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    assert cfg.run_folder("mt-dense") == shared / "runs" / "mt-dense"
    assert cfg.run_folder("mt-movement-0.5") == tmp_path / "study" / "runs" / "mt-movement-0.5"
    assert f"distill.teacher={shared / 'runs' / 'mt-dense'}" in plan.by_name["mt-movement-0.5"].overrides
    teacher = shared / "runs" / "st-rte-dense"
    teacher.mkdir(parents=True)
    (teacher / ".recipe").write_text("0123456789abcdef\n")  # trained by another recipe
    with pytest.raises(ConfigError, match=r"teachers_dir: .*st-rte-dense was trained with another recipe"):
        run_all(plan, only="^mt-movement-0.5$", log=lambda _: None)
    assert teacher.is_dir()  # not moved: it is the other comparison's
    (teacher / ".claim").write_text("elsewhere:1")  # being trained by the other comparison: still refused
    with pytest.raises(ConfigError, match=r"teachers_dir: .*st-rte-dense was trained with another recipe"):
        run_all(plan, only="^mt-movement-0.5$", log=lambda _: None)


def test_member_seeds_plan_a_second_seed_of_every_possible_member_and_report_the_ensembles_spread(
        tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [
        f"output_dir={tmp_path / 'out'}", f"results_dir={kept}", "budgets=[0.5]", "single_task_sizes=[0.1]",
        "member_seeds=[7]", "member_seeds_budget=0.5", "spread_seeds=[7]", "spread_budgets=[0.5]"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    seeded = sorted(s.name for s in plan.runs if s.task is not None and s.seed == 7)
    # members can be up to 0.5 - 0.1 = 0.4: rte 0.1 / 0.25, stsb 0.1 / 0.25 (rte's 0.5 cannot enter)
    assert seeded == ["st-rte-movement-0.1-seed7", "st-rte-movement-0.25-seed7", "st-stsb-movement-0.1-seed7",
                      "st-stsb-movement-0.25-seed7"]
    assert "train.seed=7" in plan.by_name["st-rte-movement-0.1-seed7"].overrides
    (kept / "runs").mkdir(parents=True)

    def write(name: str, score: float, kept_blocks: int | None) -> None:
        write_kept_result(kept, name, score, kept_blocks)

    write("mt-dense", 80.0, None)
    write("mt-movement-0.5", 70.0, 500)
    write("mt-movement-0.5-seed7", 72.0, 500)
    for name, score in {"st-rte-movement-0.25": 60.0, "st-stsb-movement-0.25": 64.0, "st-rte-movement-0.1": 50.0,
                        "st-stsb-movement-0.1": 50.0, "st-rte-movement-0.5": 40.0,
                        "st-rte-movement-0.25-seed7": 56.0, "st-stsb-movement-0.25-seed7": 60.0,
                        "st-rte-movement-0.1-seed7": 90.0}.items():  # a lucky second seed does not pick members
        write(name, score, int(float(name.split("-")[3]) * 1000))
    report = build_report(ComparePlan.build(cfg, ROOT / cfg.base))
    row = report["methods"]["movement"][0]
    assert row["best_ensemble"]["allocation"] == {"rte": "0.25", "stsb": "0.25"}
    assert row["member_seeds"] == {"means": [62.0, 58.0], "missing_seeds": [], "mean": 60.0, "range": 4.0}
    md = render_markdown(report, cfg, "mtp compare")
    assert "| movement | 0.5 | 62.00, 58.00 | 4.00 | 70.00, 72.00 | 2.00 | +11.00 |" in md
    # the summary: both sides over their seeds, the margin between the means, each side's range
    assert report["summary"] == [{"method": "movement", "budget": 0.5, "multitask": 71.0, "multitask_runs": 2,
                                  "multitask_range": 2.0, "best_ensemble": 60.0, "ensemble_runs": 2,
                                  "ensemble_range": 4.0, "ensemble_complete": True, "margin": 11.0,
                                  "margin_on_second_half": None, "runs_without_halves": [
                                      "mt-movement-0.5", "st-rte-movement-0.1", "st-rte-movement-0.25",
                                      "st-rte-movement-0.5", "st-stsb-movement-0.1", "st-stsb-movement-0.25"]}]
    assert "| movement | 0.5 | 71.00 [2.00, 2 runs] | 60.00 [4.00, 2 runs] | +11.00 | — |" in md
    with pytest.raises(ConfigError, match="member_seeds_budget: 0.3 is not one of budgets"):
        load_compare_config(ROOT / "configs/compare_tiny.yaml", ["member_seeds=[7]", "member_seeds_budget=0.3"])


def test_second_seeds_are_trained_for_the_best_ensembles_members_once_their_grid_has_finished(
        tmp_path: Path, monkeypatch) -> None:
    """member_seeds_for: best_ensemble (the default): one `mtp compare` trains the grid, then chooses each method's
    best ensemble at member_seeds_budget from the first seeds and trains only its members' second seeds; before the
    grid is complete every second seed waits, and --plan says so."""
    import mtp.compare as compare
    from mtp.compare import describe_plan, load_compare_config, runner
    from mtp.compare.report import member_seed_decisions

    out, kept = tmp_path / "out", tmp_path / "kept"
    overrides = [f"output_dir={out}", f"results_dir={kept}", "teachers=false", "budgets=[0.5]",
                 "single_task_sizes=[0.1]", "member_seeds=[7]", "member_seeds_budget=0.5"]
    config = ROOT / "configs/compare_tiny.yaml"
    cfg = load_compare_config(config, overrides)
    scores = {"st-rte-movement-0.25": 60.0, "st-stsb-movement-0.25": 64.0, "st-rte-movement-0.1": 50.0,
              "st-stsb-movement-0.1": 50.0, "st-rte-movement-0.5": 40.0}
    started: list[str] = []

    def fake_start(_plan, spec, *_args, **_kwargs):
        started.append(spec.name)
        score = scores.get(spec.name, 55.0)
        return ended_run(out / "runs" / spec.name, {
            "finished": True, "mean_score": score, "params": {"encoder_blocks": 1000, "embeddings": 10},
            "tasks": {"rte": {"score": score}, "stsb": {"score": score}},
            "pruning": None if spec.method == "none" else {"kept_blocks": int(spec.size * 1000)}})

    monkeypatch.setattr(runner, "start_run", fake_start)
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    seeds = sorted(s.name for s in plan.runs if s.seed == 7)
    assert set(member_seed_decisions(plan).values()) == {"waits for the grid at B = 0.5: no run has finished"}
    # the grid without stsb at 0.25: every second seed waits for it
    status = compare.run_all(plan, only="^(?!st-stsb-movement-0.25$)", log=lambda _: None)
    assert not any(n.endswith("-seed7") for n in started)
    assert {status[n] for n in seeds} == {"waits for movement's grid at B = 0.5: 1 candidate runs unfinished"}
    plan_lines = describe_plan(config, overrides, only="-seed7$").splitlines()
    assert plan_lines[-1] == "4 runs: 4 waits"
    # the whole comparison: the last grid run first, then the members' second seeds (rte 0.25 + stsb 0.25)
    started.clear()
    lines: list[str] = []
    status = compare.run_all(ComparePlan.build(cfg, ROOT / cfg.base), log=lines.append)
    assert started == ["st-stsb-movement-0.25", "st-rte-movement-0.25-seed7", "st-stsb-movement-0.25-seed7"]
    assert status["st-rte-movement-0.1-seed7"] == "skipped: not a member of movement's best ensemble at B = 0.5 " \
        "(rte at 0.25)"
    assert "compare: 13 runs, 8 already finished, 5 to train; 4 second seeds wait for the best ensembles" in lines
    plan_lines = describe_plan(config, overrides, only="-seed7$").splitlines()
    assert plan_lines[-1] == "4 runs: 2 finished, 2 skipped"
    # every candidate's second seed on request
    every = load_compare_config(config, [*overrides, "member_seeds_for=every_candidate"])
    assert set(member_seed_decisions(ComparePlan.build(every, ROOT / every.base)).values()) == {None}


def test_the_plan_lists_every_run_with_its_length_and_where_it_stands(tmp_path: Path) -> None:
    """`mtp compare --plan`: finished (in its run folder, or kept results of this recipe: a teacher without weights
    says it is trained again), claimed by a live process, resumable from its checkpoint, stale (a folder of another
    recipe) and to train, with each run's steps or epochs; looking moves, takes and writes nothing."""
    import os
    import socket

    from mtp.compare import describe_plan, load_compare_config, set_aside_if_stale

    out, kept = tmp_path / "out", tmp_path / "kept"
    overrides = [f"output_dir={out}", f"results_dir={kept}", "single_task_steps={stsb: 5}",
                 'overrides_by_run={"^st-rte-dense$": ["train.max_steps=null", "train.epochs=3"]}']
    config = ROOT / "configs/compare_tiny.yaml"
    cfg = load_compare_config(config, overrides)
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    fingerprint = {s.name: plan.fingerprint(s) for s in plan.runs}
    (kept / "runs").mkdir(parents=True)
    (kept / "runs" / "mt-dense.json").write_text(json.dumps({"recipe": fingerprint["mt-dense"], "finished": True,
                                                            "steps": 8, "wall_time_s": 16.0}))  # 2 s a step
    (kept / "runs" / "st-rte-movement-0.2.json").write_text(json.dumps({"recipe": "another", "finished": True}))

    def folder(name: str, recipe: str | None = None, **files: str) -> Path:
        run_dir = out / "runs" / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / ".recipe").write_text((recipe or fingerprint[name]) + "\n")
        for file, text in files.items():
            (run_dir / file.replace("__", "/")).parent.mkdir(exist_ok=True)
            (run_dir / file.replace("__", "/")).write_text(text)
        return run_dir

    here = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process of this host that has exited
    folder("st-rte-dense", **{"results.json": json.dumps({"finished": True}), "final__model.safetensors": ""})
    claimed = folder("mt-movement-0.5", **{".claim": "another-host:123"})
    folder("mt-movement-0.2", **{".claim": f"{here}:{os.getpid()}"})
    folder("st-stsb-movement-0.1", **{"checkpoints__latest": "step_3", ".claim": f"{here}:{dead_pid}"})
    stale = folder("st-rte-movement-0.1", recipe="0123456789abcdef", **{".claim": f"{here}:{dead_pid}"})

    lines = describe_plan(config, overrides).splitlines()
    state = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines[:-2]}
    assert len(state) == len(plan.runs)
    assert state["mt-dense"].endswith("finished (kept results; no weights here: trained again before a pruned run that "
                                      "needs it, or when --only selects dense runs alone)")
    assert state["st-rte-dense"] == "3 epochs  finished"
    assert state["mt-movement-0.5"] == "8 steps  claimed by another-host:123"
    assert state["mt-movement-0.2"] == f"8 steps  claimed by {here}:{os.getpid()}"
    assert state["st-stsb-movement-0.1"] == "5 steps  resumes from step_3"  # a dead claim holds nothing
    assert state["st-rte-movement-0.1"] == "8 steps  stale: 0123456789abcdef"
    assert state["st-rte-movement-0.2"] == "8 steps  to train (its kept results are of another recipe)"
    assert state["st-stsb-movement-0.25"] == "5 steps  to train"
    n = len(plan.runs)
    assert lines[-2] == f"{n} runs: 2 finished, 2 claimed, 1 resumes, 1 stale, {n - 6} to train"
    # no run of the kinds to train (single-task, and multitask pruned) has a finished run with its steps and wall
    # time to go by: the time left is unknown (the stale run counts: it is set aside and trained)
    assert lines[-1] == f"time left: unknown: {n - 4} runs with no finished run of the same task, dense or pruned, " \
        "to go by"
    assert describe_plan(config, overrides, only="^st-stsb-").splitlines()[-2:] == [
        "3 runs: 1 resumes, 2 to train",
        "time left: unknown: 3 runs with no finished run of the same task, dense or pruned, to go by"]
    dense = [line.split(maxsplit=1) for line in describe_plan(config, overrides, only="dense$").splitlines()]
    assert dense == [["mt-dense", "8 steps  to train again (kept results, no weights here; --only selects dense runs "
                                  "alone)"], ["st-rte-dense", "3 epochs  finished"],
                     ["st-stsb-dense", "8 steps  to train"], ["3", "runs: 1 finished, 2 to train"],
                     ["time", "left: about 16 s of training for 1 run, one at a time at the median seconds per step "
                              "of the finished runs of the same task, dense or pruned; 1 run with no finished run "
                              "of the same task, dense or pruned, to go by"]]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "mtp", "compare", "--plan", "--config", str(config), "--only", "^mt-",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "3 runs: 1 finished, 2 claimed"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, moved or taken
    assert (claimed / ".claim").read_text() == "another-host:123"
    # training moves a stale folder aside even when a dead process's claim is left in it
    assert set_aside_if_stale(plan, plan.by_name["st-rte-movement-0.1"]).name == \
        "st-rte-movement-0.1.stale-0123456789abcdef"
    assert not stale.exists()
    # the time left counts a resumed run's steps from its checkpoint: st-stsb-movement-0.25 finished 5 steps in 10 s,
    # st-stsb-movement-0.1 resumes from step 3 of 5
    (kept / "runs" / "st-stsb-movement-0.25.json").write_text(json.dumps({
        "recipe": fingerprint["st-stsb-movement-0.25"], "finished": True, "steps": 5, "wall_time_s": 10.0}))
    assert describe_plan(config, overrides, only="^st-stsb-").splitlines()[-1] == (
        "time left: about 4 s of training for 1 run, one at a time at the median seconds per step of the finished "
        "runs of the same task, dense or pruned; 1 run with no finished run of the same task, dense or pruned, to go "
        "by")
    # a stale teacher is moved aside before it trains again: its checkpoint does not count (8 steps at 2 s, not 2)
    folder("mt-dense", recipe="fedcba9876543210", **{"checkpoints__latest": "step_6"})
    (out / "runs" / "mt-movement-0.2" / ".claim").unlink()  # its student, free to train
    assert describe_plan(config, overrides, only="^mt-movement-0.2$").splitlines()[-2:] == [
        "1 runs: 1 to train (and 1 teacher again: mt-dense)",
        "time left: about 16 s of training for 1 run, one at a time at the median seconds per step of the finished "
        "runs of the same task, dense or pruned; 1 run with no finished run of the same task, dense or pruned, to go "
        "by"]
    # a run trained by epochs whose results hold no steps (st-rte-dense here) has no known length; waiting second
    # seeds are named, not counted
    from mtp.compare.command import time_left
    assert time_left(plan, [plan.by_name["st-rte-dense"]], waiting=2) == (
        "time left: unknown: 1 run trained by epochs, of unknown length; 2 runs waiting for their grid, not counted")
    bad = subprocess.run([sys.executable, "-m", "mtp", "compare", "--plan", "--config", str(config),
                          "single_task_steps={stsb: abc}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("single_task_steps.stsb: a positive number of steps, got 'abc'")


def test_the_report_counts_many_unfinished_runs_per_method(tmp_path: Path) -> None:
    from mtp.compare import build_report, load_compare_config, render_markdown

    kept = tmp_path / "kept"
    cfg = load_compare_config(ROOT / "configs/compare_tiny.yaml", [f"output_dir={tmp_path / 'out'}",
                                                                   f"results_dir={kept}", "methods=[movement,rank]"])
    plan = ComparePlan.build(cfg, ROOT / cfg.base)
    (kept / "runs").mkdir(parents=True)
    write_kept_result(kept, "mt-dense", 80.0, None)
    report = build_report(plan)
    unfinished = [s for s in plan.runs if s.name != "mt-dense"]
    assert len(unfinished) > 12 and report["missing_runs"] == sorted(s.name for s in unfinished)
    counts = {m: sum(s.method == m for s in unfinished) for m in ("none", "movement", "rank")}
    assert report["missing_by_method"] == {"dense": counts["none"], "movement": counts["movement"],
                                           "rank": counts["rank"]}
    assert (f"Runs not finished yet: {len(unfinished)} (movement {counts['movement']}, rank {counts['rank']}, "
            f"dense {counts['none']}); report.json's missing_runs names them") in render_markdown(report, cfg, "mtp")

"""Training the planned runs: each an ordinary launch.sh job, claimed one by one, teachers first."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mtp.compare.estimate import time_left
from mtp.compare.plan import ComparePlan, RunSpec, is_member_seed, retrain_pattern, select_runs
from mtp.compare.report import member_seed_decisions
from mtp.compare.store import (
    claim,
    claim_holder,
    finished_results,
    has_current_weights,
    is_teacher_without_weights,
    keep_results,
    retrain_state,
    set_aside_if_stale,
    supersede,
    superseded_results,
    wants_weights,
)
from mtp.run_folder import checkpoint_tag_file, is_finished
from mtp.schema import PROJECT_ROOT


def launch_command(plan: ComparePlan, spec: RunSpec, port: int) -> list[str]:
    """The launch.sh command that trains one run (resuming it if it has checkpoints)."""
    cfg = plan.cfg
    run_dir = cfg.run_folder(spec.name)
    args = ["bash", str(PROJECT_ROOT / "launch.sh"), "--nproc", str(cfg.nproc), "--master_port", str(port),
            *cfg.launcher_args, "--config", str(plan.base_path)]
    if checkpoint_tag_file(run_dir).exists():  # (an empty one is refused by the trainer's check in one line)
        args.append("--resume")
    return [*args, *plan.overrides(spec), f"output_dir={run_dir}"]


def start_run(plan: ComparePlan, spec: RunSpec, port: int, parallel: int = 1) -> subprocess.Popen:
    """Start one run through launch.sh; runs side by side share the cores (one OpenMP pool per rank)."""
    cfg = plan.cfg
    run_dir = cfg.run_folder(spec.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".recipe").write_text(plan.fingerprint(spec) + "\n")
    args = launch_command(plan, spec, port)
    log = (run_dir / "launch.log").open("a")
    log.write(f"\n$ {' '.join(args)}\n")
    log.flush()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * cfg.nproc))))
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env)


def run_all(plan: ComparePlan, parallel: int = 1, only: str | None = None, log: Any = print,
            retrain: str | None = None) -> dict[str, str]:
    """Run every planned run not yet finished (claimed one by one); returns name -> status. A teacher whose weights
    are not here is trained again first where a run to train needs it, or when `only` selects dense runs alone
    (its kept results stay). A finished pruned run that `retrain` matches is trained again once, its earlier results
    set aside (store.supersede). Second seeds of single-task runs (member_seeds) come last: with `member_seeds_for:
    best_ensemble` only those of the best ensembles' members are trained, once the grid they are chosen from has
    finished."""
    cfg = plan.cfg
    chosen = select_runs(plan.runs, only)
    retrain_re = retrain_pattern(retrain, plan.runs, only)
    weights_wanted = wants_weights(chosen, only)
    checked: set[str] = set()
    if cfg.teachers_dir:  # a shared teacher of another recipe is refused before anything starts
        for spec in plan.runs:
            if spec.method == "none":
                set_aside_if_stale(plan, spec)
                checked.add(spec.name)
    status: dict[str, str] = {}
    pending = []
    retrained: set[str] = set()  # teachers whose weights are gone (results kept, folder not): trained again
    again_once: set[str] = set()  # finished pruned runs that --retrain trains again

    def set_aside_once(spec: RunSpec) -> None:
        """Move a run folder of another recipe aside (each run checked once)."""
        if spec.name in checked:
            return
        checked.add(spec.name)
        moved = set_aside_if_stale(plan, spec)
        if moved is not None:
            log(f"compare: {spec.name}: its run folder holds another recipe; moved to {moved}")

    for spec in chosen:
        set_aside_once(spec)
        again = retrain_state(plan, spec, retrain_re)
        if again == "done":
            log(f"compare: {spec.name} was trained again already (--retrain; its earlier results are in "
                f"{superseded_results(cfg, spec.name)}): its new results stand")
        if again == "again":
            again_once.add(spec.name)
            pending.append(spec)
        elif finished_results(plan, spec) is not None:
            keep_results(plan, spec)
            if weights_wanted and is_teacher_without_weights(plan, spec):
                log(f"compare: {spec.name} is trained again: --only selects dense runs alone and this teacher's "
                    "weights are not here")
                pending.append(spec)
                retrained.add(spec.name)
            else:
                status[spec.name] = "reused"
        else:
            pending.append(spec)
    to_train = len(pending) - len(retrained)
    by_name = plan.by_name
    for spec in list(pending):
        teacher = by_name.get(spec.teacher or "")
        if teacher:  # a teacher's folder of another recipe holds no usable weights
            set_aside_once(teacher)
        if teacher and teacher not in pending and not has_current_weights(plan, teacher):
            log(f"compare: {teacher.name} is trained again: {spec.name} starts from its weights")
            pending.insert(0, teacher)
            retrained.add(teacher.name)
            status.pop(teacher.name, None)
    seeds = [s for s in pending if is_member_seed(s)] if cfg.member_seeds_for == "best_ensemble" else []
    again = f" (and {len(retrained)} teacher{'s' * (len(retrained) > 1)} again)" if retrained else ""
    later = f"; {len(seeds)} second seeds wait for the best ensembles" if seeds else ""
    log(f"compare: {len(chosen)} runs, {len(chosen) - to_train} already finished, {to_train} to train{again}{later}")
    decisions = member_seed_decisions(plan) if seeds else {}  # seeds whose grid is complete train now
    going = [s for s in pending if (s not in seeds or decisions[s.name] is None)
             and claim_holder(cfg.run_folder(s.name)) is None]  # as --plan: runs another process holds are its own
    waiting = sum(1 for s in seeds if (decisions[s.name] or "").startswith("waits"))
    estimate = time_left(plan, going, again_once, waiting=waiting)
    if estimate:
        log(f"compare: {estimate}")
    _train(plan, [s for s in pending if s not in seeds], parallel, retrained, status, log, again_once)
    if seeds:
        decisions = member_seed_decisions(plan)
        for spec in seeds:
            if decisions[spec.name] is not None:
                status[spec.name] = decisions[spec.name]
                log(f"compare: {spec.name}: {status[spec.name]}")
        _train(plan, [s for s in seeds if decisions[s.name] is None], parallel, set(), status, log, again_once)
    return status


def _train(plan: ComparePlan, pending: list[RunSpec], parallel: int, retrained: set[str], status: dict[str, str],
           log: Any, again_once: set[str] | None = None) -> None:
    """Train `pending` (teachers before their students, `parallel` at a time); fills `status`. A finished run named
    in `again_once` (`--retrain`) has its earlier results set aside only once it is claimed here and its teacher is
    ready, and only if no other process has trained it again meanwhile."""
    cfg = plan.cfg
    pending = list(pending)
    by_name = plan.by_name
    active: list[tuple[RunSpec, subprocess.Popen]] = []
    base_port = 29600 + os.getpid() % 1000
    slot = 0
    while pending or active:
        while pending and len(active) < parallel:
            teachers = {s.teacher for s in pending if s.teacher is not None}  # each teacher's folder read once
            with_weights = {t for t in teachers if has_current_weights(plan, by_name[t])}
            ready = [s for s in pending if s.teacher is None or s.teacher in with_weights]
            waiting_on = {s.teacher for s in pending} - {s.name for s in ready}
            if not ready:
                if active or any((cfg.run_folder(str(t)) / ".claim").exists() for t in waiting_on):
                    break  # a teacher is being trained here or elsewhere
                for spec in pending:
                    status[spec.name] = f"not trained: its teacher {spec.teacher} did not finish"
                    log(f"compare: {spec.name}: {status[spec.name]}")
                pending.clear()
                break
            spec = ready[0]
            pending.remove(spec)
            if not claim(cfg.run_folder(spec.name)):
                status[spec.name] = "claimed elsewhere"
                continue
            if (spec.name in (again_once or ()) and not superseded_results(cfg, spec.name).is_file()
                    and finished_results(plan, spec) is not None):  # under the claim: nobody else moves or trains it
                moved = supersede(plan, spec)
                log(f"compare: {spec.name} is trained again (--retrain): its earlier results moved to {moved}")
            done = (has_current_weights(plan, spec) if spec.name in retrained  # its kept results don't count
                    else finished_results(plan, spec) is not None)
            if done:  # another process finished it meanwhile
                (cfg.run_folder(spec.name) / ".claim").unlink(missing_ok=True)
                keep_results(plan, spec)
                status[spec.name] = "reused"
                continue
            log(f"compare: training {spec.name}")
            active.append((spec, start_run(plan, spec, base_port + 10 * (slot % 50), parallel)))
            slot += 1
        for item in list(active):
            spec, proc = item
            if proc.poll() is not None:
                active.remove(item)
                _finish(spec, proc.returncode, cfg.run_folder(spec.name), status, log)
                kept = keep_results(plan, spec)
                if kept is not None and spec.name in retrained:
                    here = (finished_results(plan, spec) or {}).get("mean_score")
                    log(f"compare: {spec.name} trained again for its weights: mean {_score(here)} here, "
                        f"{_score(kept.get('mean_score'))} in its kept results, which stay (the finished runs "
                        "learned from that training)")
        if active or pending:
            time.sleep(1)


def _score(value: Any) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _finish(spec: RunSpec, code: int, run_dir: Path, status: dict[str, str], log: Any) -> None:
    (run_dir / ".claim").unlink(missing_ok=True)
    status[spec.name] = "trained" if code == 0 and is_finished(run_dir) else f"failed (exit {code})"
    log(f"compare: {spec.name}: {status[spec.name]}")

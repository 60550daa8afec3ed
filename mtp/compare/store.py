"""The run store: one folder per run under output_dir/runs (claims, recipe fingerprints, stale runs set aside), and
the light results folder (results_dir) whose kept results let a comparison continue on another machine."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

from mtp.compare.config import CompareConfig
from mtp.compare.plan import ComparePlan, RunSpec
from mtp.config import ConfigError, saved_config
from mtp.run_folder import (
    FINAL,
    checkpoint_tag_file,
    has_weights,
    is_finished,
    latest_checkpoint,
    read_results_dict,
)


def claim(run_dir: Path) -> bool:
    """Take the run for this process (a claim file); a claim of a dead process on this host is taken over. The
    processes of one host take claims one at a time (a lock on CLAIM_LOCK), so two of them never both take over the
    same dead claim; across hosts the claim file's exclusive creation decides."""
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / ".claim"
    me = f"{socket.gethostname()}:{os.getpid()}"
    with open(run_dir / CLAIM_LOCK, "a") as lock:
        _lock(lock)  # released when the file closes
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                return True
            except FileExistsError:
                if claim_holder(run_dir) is None:  # a dead process's claim on this host
                    claim.unlink(missing_ok=True)
                    continue
                return False
    return False


CLAIM_LOCK = ".claim.lock"
"""The lock file in a run folder that this host's processes hold while they take its claim."""


def _lock(lock: Any) -> None:
    """An exclusive flock on an open file; where the file system has no locks (NFS without its lock daemon, Lustre
    without `-o flock`) one warning, and claims are taken as before the lock (the claim file's exclusive creation
    still decides; only two processes of one host taking over the same dead claim at once could both succeed)."""
    global _UNLOCKED_WARNED
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if not _UNLOCKED_WARNED:
            warnings.warn(f"compare: no file locks where the runs are ({error.strerror}): claims are taken without "
                          "the lock", stacklevel=3)
            _UNLOCKED_WARNED = True


_UNLOCKED_WARNED = False


def claim_holder(run_dir: Path) -> str | None:
    """Who holds the run's claim ("HOST:PID"; "" when the file is empty, as while it is being written), or None when
    nobody does: no claim file, or one of a process on this host that is no longer alive."""
    try:
        holder = (run_dir / ".claim").read_text()
    except FileNotFoundError:
        return None
    host, _, pid = holder.partition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return None
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def report_dir(cfg: CompareConfig) -> Path:
    """Where the report (and, with results_dir, the kept results of finished runs) is written."""
    return Path(cfg.results_dir or cfg.output_dir)


def recipe_fingerprint(plan: ComparePlan, spec: RunSpec) -> str:
    """A hash of the run's whole resolved experiment config (output dir aside): a changed recipe changes it."""
    return plan.fingerprint(spec)


def run_dir_recipe(run_dir: Path, plan: ComparePlan, spec: RunSpec) -> str | None:
    """The fingerprint of the recipe a run folder was trained with: the .recipe file compare writes when it starts
    the run, else (folders from before that file) the config saved with its final model, its teacher named as the
    plan's fingerprint names it (ComparePlan.recorded_hash); None if neither."""
    marker = run_dir / ".recipe"
    if marker.is_file():
        return marker.read_text().strip()
    meta = run_dir / FINAL / "mtp.json"
    if meta.is_file():
        return plan.recorded_hash(spec, saved_config(json.loads(meta.read_text())["config"]))
    return None


def _current(run_dir: Path, spec: RunSpec, plan: ComparePlan) -> bool:
    """Whether a run folder holds this recipe's run (or one whose recipe it cannot tell)."""
    stored = run_dir_recipe(run_dir, plan, spec)
    return stored is None or plan.matches(stored, spec)


def holds_other_recipe(plan: ComparePlan, spec: RunSpec) -> bool:
    """Whether the run's folder is there and holds another recipe's run (set aside before training: from step 0)."""
    run_dir = plan.cfg.run_folder(spec.name)
    return run_dir.is_dir() and not _current(run_dir, spec, plan)


def set_aside_if_stale(plan: ComparePlan, spec: RunSpec) -> Path | None:
    """Move a run folder trained (or started) with another recipe to NAME.stale-FINGERPRINT, so that it is neither
    reused nor resumed; nothing is deleted. Returns the new place, or None if there was nothing to move."""
    run_dir = plan.cfg.run_folder(spec.name)
    shared = bool(plan.cfg.teachers_dir) and spec.method == "none"  # another comparison's teacher
    if not holds_other_recipe(plan, spec) or (not shared and claim_holder(run_dir) is not None):
        return None  # a claimed folder is another process's to train
    stored = run_dir_recipe(run_dir, plan, spec)
    if shared:  # checked even while claimed (.recipe is written before its training starts), and never moved
        raise ConfigError(f"compare: teachers_dir: {run_dir} was trained with another recipe "
                          f"({stored}; this plan's {spec.name} is {plan.fingerprint(spec)})")
    stale = f"{spec.name}.stale-{stored}"
    target, n = run_dir.with_name(stale), 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{stale}-{n}")
    run_dir.rename(target)
    return target


def finished_results(plan: ComparePlan, spec: RunSpec) -> dict[str, Any] | None:
    """A finished run's results.json made by this recipe: from its run dir, else from the results folder (results
    whose recipe is unknown count as the same); None if not finished."""
    cfg = plan.cfg
    run_dir = cfg.run_folder(spec.name)
    if is_finished(run_dir) and _current(run_dir, spec, plan):
        return read_results_dict(run_dir)
    kept = report_dir(cfg) / "runs" / f"{spec.name}.json"
    if cfg.results_dir and kept.is_file():
        results = json.loads(kept.read_text())
        stored = results.get("recipe")
        if stored is None or plan.matches(stored, spec):
            return results
    return None


def keep_results(plan: ComparePlan, spec: RunSpec) -> dict[str, Any] | None:
    """Copy a finished run's results.json into the results folder, with its recipe's fingerprint and this machine's
    data paths made portable (a GLUE folder becomes $MTP_GLUE_DIR/TASK). A dense run whose results of this recipe
    are kept already (a teacher trained again for its weights; CPU training is not bit-reproducible) leaves them as
    they are, and those kept results are returned; otherwise None."""
    cfg = plan.cfg
    run_dir = cfg.run_folder(spec.name)
    if not cfg.results_dir or not is_finished(run_dir) or not _current(run_dir, spec, plan):
        return None
    results = read_results_dict(run_dir) or {}
    results["recipe"] = plan.fingerprint(spec)
    glue = os.environ.get("MTP_GLUE_DIR")
    for entry in results.get("data", {}).values():
        source = Path(str(entry.get("source", "")))
        if source.is_absolute():
            inside = glue and source.resolve().is_relative_to(Path(glue).resolve())
            entry["source"] = f"$MTP_GLUE_DIR/{source.name}" if inside else f".../{source.name}"
    target = report_dir(cfg) / "runs" / f"{spec.name}.json"
    if spec.method == "none" and target.is_file():
        kept = json.loads(target.read_text())
        if kept.get("recipe") in (None, results["recipe"]):
            return kept  # a teacher trained again for its weights: the finished runs learned from the kept training
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    return None


SUPERSEDED = "superseded"
"""The folder (in the results folder, and in output_dir for run folders) where `--retrain` keeps a run's earlier
results."""


def superseded_results(cfg: CompareConfig, name: str) -> Path:
    """Where `--retrain` keeps a run's earlier results: RESULTS/superseded/NAME.json (RESULTS: results_dir, else
    output_dir). Its presence says the run has been trained again once."""
    return report_dir(cfg) / SUPERSEDED / f"{name}.json"


def retrain_state(plan: ComparePlan, spec: RunSpec, retrain: re.Pattern[str] | None) -> str | None:
    """What `--retrain` does to one run: "again" (a finished pruned run it matches: trained again), "done" (it has
    been trained again already: its earlier results are superseded, its new ones stand), or None (not matched, or
    nothing finished to train again: an interrupted retraining resumes as any run does)."""
    if retrain is None or spec.method == "none" or not retrain.search(spec.name):
        return None
    if finished_results(plan, spec) is None:
        return None
    return "done" if superseded_results(plan.cfg, spec.name).is_file() else "again"


def supersede(plan: ComparePlan, spec: RunSpec) -> Path:
    """Set a finished run's results aside before it is trained again (`--retrain`; called by the process that holds
    the run's claim): its run folder's contents but the claim and its lock to OUTPUT/superseded/NAME, then its kept
    results (or its run folder's results.json) to RESULTS/superseded/NAME.json, last: that file says the run was
    trained again, so it appears only once nothing of the earlier training is left to be taken for the new one.
    Nothing is deleted. Returns where its results went."""
    cfg = plan.cfg
    target = superseded_results(cfg, spec.name)
    kept = report_dir(cfg) / "runs" / f"{spec.name}.json"
    run_dir = cfg.run_folder(spec.name)
    contents = [p for p in run_dir.iterdir() if p.name not in (".claim", CLAIM_LOCK)] if run_dir.is_dir() else []
    folder = None
    if contents:
        folder, n = Path(cfg.output_dir) / SUPERSEDED / spec.name, 1
        while folder.exists():
            n += 1
            folder = Path(cfg.output_dir) / SUPERSEDED / f"{spec.name}-{n}"
        folder.mkdir(parents=True)
        for path in contents:
            path.rename(folder / path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if cfg.results_dir and kept.is_file():
        kept.rename(target)
    elif folder is not None and (folder / "results.json").is_file():
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text((folder / "results.json").read_text())
        partial.rename(target)
    return target


def has_current_weights(plan: ComparePlan, spec: RunSpec) -> bool:
    """Whether the run's folder holds final weights of this recipe (a folder of another recipe does not count)."""
    run_dir = plan.cfg.run_folder(spec.name)
    return has_weights(run_dir) and _current(run_dir, spec, plan)


def is_teacher_without_weights(plan: ComparePlan, spec: RunSpec) -> bool:
    """Whether a dense run is a teacher of this comparison (a pruned run starts from it or distils from it) whose
    weights of this recipe are not in its folder (in teachers_dir when the comparison shares another's teachers),
    though its results may be kept: a pruned run that needs it trains it again first, and so does a `--only` that
    selects dense runs alone (`wants_weights`)."""
    if spec.method != "none":
        return False
    return any(s.teacher == spec.name for s in plan.runs) and not has_current_weights(plan, spec)


def wants_weights(chosen: list[RunSpec], only: str | None) -> bool:
    """Whether a `--only` selection asks for the weights of its dense runs: it selects dense runs and nothing else
    (`--only '^mt-dense$'` gives a search or another comparison its teacher); a selection with pruned runs trains a
    teacher again only where one of them needs it."""
    return only is not None and bool(chosen) and all(s.method == "none" for s in chosen)


def run_state(plan: ComparePlan, spec: RunSpec, weights_wanted: bool = False) -> str:
    """Where one planned run stands, without touching it: "finished" (its run folder or the kept results hold this
    recipe), "claimed by HOST:PID" (a live process trains it), "resumes from step_N" (a checkpoint of this recipe),
    "stale: FINGERPRINT" (its folder holds another recipe: moved aside when training starts, or refused for a
    shared teacher) or "to train". `weights_wanted`: the selection asks for its teachers' weights (`wants_weights`),
    so a teacher with kept results and no weights is "to train again"."""
    cfg = plan.cfg
    run_dir = cfg.run_folder(spec.name)
    if finished_results(plan, spec) is not None:
        if is_teacher_without_weights(plan, spec):
            holder = claim_holder(run_dir) if run_dir.is_dir() else None
            if holder is not None:
                return f"claimed by {holder or 'a process still writing its claim'} (trained again for its weights)"
            if weights_wanted:
                return "to train again (kept results, no weights here; --only selects dense runs alone)"
            return ("finished (kept results; no weights here: trained again before a pruned run that needs it, or "
                    "when --only selects dense runs alone)")
        return "finished"
    kept = report_dir(cfg) / "runs" / f"{spec.name}.json"
    elsewhere = " (its kept results are of another recipe)" if cfg.results_dir and kept.is_file() else ""
    if not run_dir.is_dir():
        return "to train" + elsewhere
    holder = claim_holder(run_dir)
    if holder is not None:
        return f"claimed by {holder or 'a process still writing its claim'}"
    if not _current(run_dir, spec, plan):
        shared = " (another comparison's teacher: refused)" if cfg.teachers_dir and spec.method == "none" else ""
        return f"stale: {run_dir_recipe(run_dir, plan, spec)}{shared}"
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return f"resumes from {latest}"
    if checkpoint_tag_file(run_dir).exists():
        return "to train, refused: its checkpoints/latest is empty (a write cut short; name the last checkpoint in it)"
    return "to train" + elsewhere

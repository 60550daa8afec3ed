"""The report: every number of the comparison from the finished runs, as JSON, markdown, a plot and TensorBoard."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mtp.compare.allocation import Choice, best_allocation, largest_member
from mtp.compare.config import CompareConfig
from mtp.compare.plan import ComparePlan, _fmt, is_member_seed
from mtp.compare.store import finished_results, report_dir
from mtp.config import ConfigError
from mtp.run_folder import RunResults


def build_report(plan: ComparePlan) -> dict[str, Any]:
    """Every number of the comparison from the finished runs (missing runs are reported, not fatal)."""
    import math

    cfg, tasks = plan.cfg, plan.tasks
    by_key = {s.key: finished_results(plan, s) for s in plan.runs}
    missing = sorted(s.name for s in plan.runs if by_key[s.key] is None)
    missing_by_method: dict[str, int] = {}
    for spec in plan.runs:
        if by_key[spec.key] is None:
            label = "dense" if spec.method == "none" else spec.method
            missing_by_method[label] = missing_by_method.get(label, 0) + 1
    any_result = next((r for r in by_key.values() if r), None)
    if any_result is None:
        raise ConfigError(f"compare: no finished run under {cfg.run_folder('')} (or {report_dir(cfg)}/runs) yet")

    def find(task: str | None, method: str, size: float, seed: int | None = None) -> dict[str, Any] | None:
        """The finished results of the run (task or None for multitask, method, size, extra seed)."""
        return by_key.get((task, method, round(size, 6), seed))

    dense_blocks = any_result["params"]["encoder_blocks"]
    embeddings = any_result["params"]["embeddings"]

    def kept(r: dict[str, Any]) -> int:
        return RunResults.model_validate(r).kept_blocks

    def task_score(r: dict[str, Any] | None, task: str) -> float | None:
        return None if r is None else r["tasks"][task]["score"]

    report: dict[str, Any] = {"tasks": tasks, "dense_blocks": dense_blocks, "embeddings_per_encoder": embeddings,
                              "methods": {}, "missing_runs": missing,
                              "missing_by_method": missing_by_method, "dense": {}, "low_resource": [], "spread": []}
    dense_mt = find(None, "none", 1.0)
    if cfg.dense_baselines:
        mt = dense_mt
        st = [find(t, "none", 1.0) for t in tasks]
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
            mt = find(None, method, budget)
            choices, members_by_task = [], []
            without_halves = [] if mt is None or all(_halves(mt, t) for t in tasks) else [f"mt-{method}-{_fmt(budget)}"]
            for t in tasks:
                opts, runs = [], []
                for spec in plan.runs:
                    r = by_key[spec.key]
                    if spec.task == t and spec.method == method and spec.seed is None and r is not None:
                        opts.append(Choice(kept(r), task_score(r, t), _fmt(spec.size)))
                        runs.append(r)
                        if _halves(r, t) is None:
                            without_halves.append(spec.name)
                choices.append(opts)
                members_by_task.append(runs)
            best = best_allocation(choices, capacity)
            # single-task runs of this method that could be ensemble members at this budget but are not finished
            # (a member leaves room for the smallest planned run of every other task): a best ensemble found
            # without them is a lower bound on the grid's
            members = [spec for spec in plan.runs
                       if spec.task is not None and spec.method == method and spec.seed is None]
            smallest = {t: min((s.size for s in members if s.task == t), default=0.0) for t in tasks}
            unfinished = [spec.name for spec in members if by_key[spec.key] is None
                          and spec.size <= largest_member(budget, smallest, spec.task) + 1e-9]
            # the grid's sizes that can be members at all: the other members of at least their smallest sizes each
            # leave at most B - (their sum) for any one
            largest = max((largest_member(budget, smallest, t) for t in tasks), default=budget)
            grid_sizes = sorted({round(s.size, 6) for s in members})
            entry = {"largest_member": largest,
                     "sizes_that_can_enter": [x for x in grid_sizes if x <= largest + 1e-9]}
            equal_runs = [find(t, method, budget / len(tasks)) for t in tasks]
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
                    "mean": best[1], "kept_blocks": sum(c.size for c in best[0]),
                    "complete": not unfinished, "unfinished_runs": unfinished},
                "equal_split": equal,
                "grid": entry,
                "member_seeds": None if best is None or budget != cfg.member_seeds_budget else member_spread(
                    cfg, tasks, method, best[0], best[1], find),
                "held_out": held_out_half(tasks, members_by_task, choices, capacity, mt),
                "runs_without_halves": without_halves,
            })
            for t in cfg.low_resource_tasks:
                if t not in tasks:
                    continue
                alone = find(t, method, budget)
                report["low_resource"].append({"task": t, "method": method, "size": budget,
                                               "alone": task_score(alone, t), "multitask": task_score(mt, t)})
        report["methods"][method] = rows
        for budget in cfg.spread_budgets:
            runs = [find(None, method, budget), *(find(None, method, budget, seed) for seed in cfg.spread_seeds)]
            means = [r["mean_score"] for r in runs if r is not None]
            report["spread"].append({
                "method": method, "budget": budget, "runs": len(means), "means": means,
                "mean": statistics.fmean(means) if means else None,
                "stdev": statistics.stdev(means) if len(means) > 1 else None,
                "range": max(means) - min(means) if len(means) > 1 else None})
    report["size_at_fix"] = size_checks(plan, by_key)
    report["exposure"] = exposure(plan, by_key)
    report["summary"] = summary(report)
    return report


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method and budget: the multitask mean (over its seeds where there are several), the best
    ensemble's mean (over its members' seeds where they ran), the margin between the two with each side's range, and
    the margin on the held-out halves of the dev sets where every run scored them."""
    spread = {(r["method"], r["budget"]): r for r in report.get("spread", [])}
    rows = []
    for method, method_rows in report["methods"].items():
        for row in method_rows:
            mt, ens = row["multitask"], row["best_ensemble"]
            seeds = spread.get((method, row["budget"]))
            mt_mean = seeds["mean"] if seeds and seeds["runs"] > 1 else (mt or {}).get("mean")
            members = row.get("member_seeds") or {}
            ens_mean = members["mean"] if len(members.get("means", [])) > 1 else (ens or {}).get("mean")
            held = row.get("held_out") or {}
            rows.append({
                "method": method, "budget": row["budget"], "multitask": mt_mean,
                "multitask_runs": seeds["runs"] if seeds and seeds["runs"] > 1 else int(mt is not None),
                "multitask_range": seeds["range"] if seeds else None,
                "best_ensemble": ens_mean, "ensemble_runs": len(members.get("means", [])) or int(ens is not None),
                "ensemble_range": members.get("range"),
                "ensemble_complete": bool(ens and ens.get("complete")),
                "margin": None if mt_mean is None or ens_mean is None else mt_mean - ens_mean,
                "margin_on_second_half": held.get("margin_on_second_half"),
                "runs_without_halves": row.get("runs_without_halves", [])})
    return rows


def member_seed_decisions(plan: ComparePlan) -> dict[str, str | None]:
    """For every planned extra seed of a single-task run: None when it is to be trained, else why not. With
    `member_seeds_for: best_ensemble` a seed is trained when its first seed is a member of its method's best ensemble
    at `member_seeds_budget` over a complete grid (every run that could be a member finished): chosen on the first
    seeds alone, so a lucky second seed cannot pick the members."""
    cfg = plan.cfg
    seeds = [s for s in plan.runs if is_member_seed(s)]
    if cfg.member_seeds_for == "every_candidate" or not seeds:
        return {s.name: None for s in seeds}
    budget = cfg.member_seeds_budget
    try:
        rows = build_report(plan)["methods"]
    except ConfigError:  # nothing has finished
        return {s.name: f"waits for the grid at B = {budget:g}: no run has finished" for s in seeds}
    out: dict[str, str | None] = {}
    for spec in seeds:
        best = next(r for r in rows[spec.method] if r["budget"] == budget)["best_ensemble"]
        if best is None or not best["complete"]:
            left = "" if best is None else f": {len(best['unfinished_runs'])} candidate runs unfinished"
            out[spec.name] = f"waits for {spec.method}'s grid at B = {budget:g}{left}"
        elif best["allocation"][spec.task] == _fmt(spec.size):
            out[spec.name] = None
        else:
            out[spec.name] = (f"skipped: not a member of {spec.method}'s best ensemble at B = {budget:g} "
                              f"({spec.task} at {best['allocation'][spec.task]})")
    return out


def member_spread(cfg: CompareConfig, tasks: list[str], method: str, members: list[Choice], mean: float,
                  find: Any) -> dict[str, Any]:
    """The best ensemble's mean with each extra seed of its members (member_seeds), beside the first seed's."""
    means, missing = [mean], []
    for seed in cfg.member_seeds:
        runs = [find(t, method, float(c.label), seed) for t, c in zip(tasks, members, strict=True)]
        if any(r is None for r in runs):
            missing.append(seed)
            continue
        means.append(sum(r["tasks"][t]["score"] for t, r in zip(tasks, runs, strict=True)) / len(tasks))
    return {"means": means, "missing_seeds": missing, "mean": statistics.fmean(means),
            "range": max(means) - min(means) if len(means) > 1 else None}


def _halves(r: dict[str, Any], task: str) -> list[float] | None:
    """A run's dev score of `task` on each half of the dev set (None in results from before mtp scored halves)."""
    return (r.get("tasks") or {}).get(task, {}).get("halves")


def held_out_half(tasks: list[str], members_by_task: list[list[dict[str, Any]]], choices: list[list[Choice]],
                  capacity: int, multitask: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best ensemble chosen on the first half of every dev set and scored on the second, beside the multitask
    model scored on the same second half: a margin free of the selection's bias. None unless every run involved
    recorded its half scores (results from before mtp scored halves: the row's runs_without_halves)."""
    halves = _halves
    if multitask is None or any(halves(multitask, t) is None for t in tasks) or any(
            halves(r, t) is None for t, runs in zip(tasks, members_by_task, strict=True) for r in runs):
        return None
    on_first = [[Choice(c.size, halves(r, t)[0], c.label) for c, r in zip(opts, runs, strict=True)]
                for t, opts, runs in zip(tasks, choices, members_by_task, strict=True)]
    best = best_allocation(on_first, capacity)
    if best is None:
        return None
    second = {}
    for t, pick, opts, runs in zip(tasks, best[0], on_first, members_by_task, strict=True):
        second[t] = halves(runs[opts.index(pick)], t)[1]
    ensemble = sum(second.values()) / len(tasks)
    mt_second = sum(halves(multitask, t)[1] for t in tasks) / len(tasks)
    return {"allocation": {t: c.label for t, c in zip(tasks, best[0], strict=True)},
            "ensemble_on_first_half": best[1], "ensemble_on_second_half": ensemble,
            "multitask_on_second_half": mt_second, "margin_on_second_half": mt_second - ensemble}


SIZE_WARNING = 1.1
"""A run whose size where its ranks or masks were fixed is above this multiple of its target, or below its inverse, is
reported: the final projection, not training, took it to its size (cut the rest, or gave back what training took
beyond it: soft movement with too strong a λ)."""


def size_checks(plan: ComparePlan, by_key: dict[Any, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Every finished run that reports its size before the final cut (rank's expected size, soft movement's kept
    fraction above its threshold): that size over its target."""
    rows = []
    for spec in plan.runs:
        pruning = (by_key[spec.key] or {}).get("pruning") or {}
        ratio = pruning.get("expected_over_target")
        if ratio is None and pruning.get("expected_fraction_at_end") is not None:  # results from before the key
            ratio = pruning["expected_fraction_at_end"] / pruning["budget_fraction"]
        if ratio is not None:
            rows.append({"run": spec.name, "expected_over_target": ratio,
                         "far": not 1 / SIZE_WARNING <= ratio <= SIZE_WARNING})
    return rows


def batches_seen(plan: ComparePlan, spec: Any, results: dict[str, Any]) -> tuple[dict[str, float], bool] | None:
    """Micro-batches each task gave the run (per rank): counted (results' batches_per_task), or, for results from
    before the count, expected from its sampling probabilities (steps x grad_accum x p); the flag says which. None
    when the results hold neither."""
    if results.get("batches_per_task"):
        return {t: float(n) for t, n in results["batches_per_task"].items()}, True
    if not results.get("sampling") or not results.get("steps"):
        return None
    accum = plan.experiment(spec).train.grad_accum
    return {t: p * results["steps"] * accum for t, p in results["sampling"].items()}, False


def exposure(plan: ComparePlan, by_key: dict[Any, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Per task: the batches the pruned multitask model saw of it and those its pruned single-task model saw (the
    first finished run of each side), and their ratio."""
    seen = {s.name: batches_seen(plan, s, by_key[s.key]) for s in plan.runs
            if s.method != "none" and by_key[s.key] is not None}
    pruned = [s for s in plan.runs if seen.get(s.name) is not None]
    multitask = next((s for s in pruned if s.task is None), None)
    if multitask is None:
        return []
    mt, mt_counted = seen[multitask.name]
    rows = []
    for task in plan.tasks:
        alone = next((s for s in pruned if s.task == task), None)
        if alone is None:
            continue
        st, st_counted = seen[alone.name]
        rows.append({"task": task, "multitask_batches": mt.get(task, 0.0), "multitask_run": multitask.name,
                     "single_task_batches": st.get(task, 0.0), "single_task_run": alone.name,
                     "ratio": mt.get(task, 0.0) / st[task] if st.get(task) else None,
                     "counted": mt_counted and st_counted})
    return rows


def _cell(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The summary as markdown lines: method x budget, multitask, best ensemble, margin with both sides' ranges."""
    def side(mean: float | None, runs: int, spread: float | None) -> str:
        if mean is None:
            return "—"
        return f"{mean:.2f}" + (f" [{spread:.2f}, {runs} runs]" if runs > 1 and spread is not None else "")

    lines = ["## Summary", "", "| method | budget | multitask | best ensemble | margin | margin, held-out half |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        partial = "" if r["ensemble_complete"] or r["best_ensemble"] is None else " (partial grid)"
        multitask = side(r["multitask"], r["multitask_runs"], r["multitask_range"])
        ensemble = side(r["best_ensemble"], r["ensemble_runs"], r["ensemble_range"])
        lines.append(f"| {r['method']} | {r['budget']:g} | {multitask} | {ensemble}{partial} | "
                     + ("—" if r["margin"] is None else f"{r['margin']:+.2f}") + " | "
                     + ("—" if r["margin_on_second_half"] is None else f"{r['margin_on_second_half']:+.2f}") + " |")
    lines.append("")
    lacking = [r for r in rows if r["margin_on_second_half"] is None and r["runs_without_halves"]]
    if lacking:
        lines += ["No held-out margin where a candidate run's results predate the half scores (train those runs "
                  "again to get it: `mtp compare ... --retrain REGEX` with their names): " + "; ".join(
                      f"{r['method']} B = {r['budget']:g}: {_names(r['runs_without_halves'])}" for r in lacking)
                  + ".", ""]
    return lines


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])} and {len(names) - shown} more"


def render_markdown(report: dict[str, Any], cfg: CompareConfig, command: str) -> str:
    tasks = report["tasks"]
    lines = ["# Multitask pruning vs the best single-task ensemble", "",
             f"Reproduce: `{command}`", "",
             f"Encoder blocks (dense): {report['dense_blocks']:,} parameters; "
             f"embeddings {report['embeddings_per_encoder']:,} per encoder (the multitask model carries one table, "
             "an ensemble of T models carries T).", ""]
    if report.get("summary"):
        lines += summary_table(report["summary"]) + [
            "Means over the multitask model's seeds and over the best ensemble's member seeds where they ran (each "
            "side's range in brackets: max - min over its runs); the held-out margin chooses the ensemble on one half "
            "of each dev set and scores both sides on the other. The sections below have every run.", ""]
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
                if key == "best_ensemble" and entry.get("unfinished_runs"):
                    alloc += (f"; over a partial grid ({len(entry['unfinished_runs'])} single-task runs not finished):"
                              " a lower bound")
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
                         + f" | {_cell(r['mean'], 2)} | {_cell(r['stdev'], 2)} | {_cell(r['range'], 2)} |")
        lines.append("")
    seeded = [(m, row) for m, rows in report["methods"].items() for row in rows if row.get("member_seeds")]
    if seeded:
        spread = {(r["method"], r["budget"]): r for r in report.get("spread", [])}
        lines += ["## Both sides' spread: the best ensemble with its members' other seeds", "",
                  "| method | budget | ensemble means (first seed, then member_seeds) | range | multitask means | "
                  "range | margin of the means |", "|---|---|---|---|---|---|---|"]
        for m, row in seeded:
            ens = row["member_seeds"]
            mt = spread.get((m, row["budget"]))
            mt_means = ", ".join(f"{x:.2f}" for x in mt["means"]) if mt else "—"
            margin = None if not mt or mt["mean"] is None else mt["mean"] - ens["mean"]
            lines.append(f"| {m} | {row['budget']:g} | " + ", ".join(f"{x:.2f}" for x in ens["means"])
                         + (f" (seeds {ens['missing_seeds']} not finished)" if ens["missing_seeds"] else "")
                         + f" | {_cell(ens['range'], 2)} | {mt_means} | {_cell(mt['range'] if mt else None, 2)} | "
                         + ("—" if margin is None else f"{margin:+.2f}") + " |")
        lines.append("")
    grid_rows = [(method, row) for method, rows in report["methods"].items() for row in rows if row.get("grid")]
    if grid_rows:
        lines += ["Single-task sizes that can be members of an ensemble (a member leaves room for the smallest run of "
                  "every other task): " + "; ".join(
                      f"{m} B = {row['budget']:g}: up to {row['grid']['largest_member']:.3g} ("
                      + ", ".join(f"{x:g}" for x in row["grid"]["sizes_that_can_enter"]) + ")"
                      for m, row in grid_rows) + ".", ""]
    held = [(method, row) for method, rows in report["methods"].items() for row in rows if row.get("held_out")]
    if held:
        lines += ["## The best ensemble chosen on one half of each dev set, scored on the other", "",
                  "The multitask model is scored on the same second half; the whole-dev tables above choose and "
                  "score on the same rows, which favours the ensemble.", "",
                  "| method | budget | allocation (chosen on the first half) | ensemble, first half | ensemble, "
                  "second half | multitask, second half | margin, second half |", "|---|---|---|---|---|---|---|"]
        for method, row in held:
            h = row["held_out"]
            alloc = ", ".join(f"{t} {b}" for t, b in h["allocation"].items())
            lines.append(f"| {method} | {row['budget']:g} | {alloc} | {h['ensemble_on_first_half']:.2f} | "
                         f"{h['ensemble_on_second_half']:.2f} | {h['multitask_on_second_half']:.2f} | "
                         f"{h['margin_on_second_half']:+.2f} |")
        lines.append("")
    far = [r for r in report.get("size_at_fix", []) if r["far"]]
    if far:
        lines += [f"**Warning**: {len(far)} run{'s' * (len(far) > 1)} ended outside {1 / SIZE_WARNING:.2f}-"
                  f"{SIZE_WARNING:g}x their size where their ranks or masks were fixed: the final projection, not "
                  "training, took them to size (size over target): " + ", ".join(
                      f"{r['run']} {r['expected_over_target']:.2f}" for r in far), ""]
    if report.get("size_at_fix"):
        ratios = [r["expected_over_target"] for r in report["size_at_fix"]]
        lines += [f"Size where the ranks or masks were fixed (rank: expected), over the target: "
                  f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} runs (report.json: size_at_fix).", ""]
    if report.get("exposure"):
        counted = all(r["counted"] for r in report["exposure"])
        lines += ["## Exposure: batches of each task seen by each side", "",
                  "Micro-batches per rank, " + ("counted by the trainer" if counted else
                                                "expected from the sampling probabilities (steps x p) where the "
                                                "results predate the count") + ".", "",
                  "| task | multitask model | single-task model | ratio |", "|---|---|---|---|"]
        for r in report["exposure"]:
            lines.append(f"| {r['task']} | {r['multitask_batches']:.0f} ({r['multitask_run']}) | "
                         f"{r['single_task_batches']:.0f} ({r['single_task_run']}) | {_cell(r['ratio'], 2)} |")
        lines.append("")
    if report["missing_runs"]:
        lines += [unfinished_line(report["missing_runs"], report.get("missing_by_method", {})), ""]
    return "\n".join(lines)


def unfinished_line(names: list[str], by_method: dict[str, int], listed: int = 12) -> str:
    """The runs not finished yet in one line: every name when there are few, else the count per method (the names
    stay in report.json's missing_runs, and `mtp compare --plan` says where each stands)."""
    if len(names) <= listed:
        return f"Runs not finished yet: {', '.join(names)}"
    counts = ", ".join(f"{method} {n}" for method, n in by_method.items())
    return (f"Runs not finished yet: {len(names)} ({counts}); report.json's missing_runs names them and "
            "`mtp compare --plan` says where each stands.")


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
            if key == "best_ensemble" and any(r[key] and r[key].get("unfinished_runs") for r in rows):
                label += " (partial grid: a lower bound)"
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


def write_report(plan: ComparePlan, command: str) -> Path:
    """report.md, report.json, mean_vs_budget.png and a TensorBoard summary in the report dir."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = plan.cfg
    report = build_report(plan)
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

"""The comparison's single-task schedule chosen by measurement: single-task runs of two lengths at the same sizes, and
what the longer one would change in the best ensembles (issue 33 point 2).

    python bench/single_task_length.py \
        --short docs/results/compare_minilm_distill/runs --long docs/results/single_task_length/runs-1500 \
        --method magnitude --sizes 0.05 0.15 --budgets 0.25 0.5 --out docs/results/single_task_length

Reads the kept results (st-TASK-METHOD-SIZE.json) of both folders. Per task and size: the score at each length and the
gain. Per budget: the best ensemble (the comparison's exact knapsack over the kept encoder-block parameters) over the
studied sizes alone, once with every member at the short length and once at the long one, and the gain of its
five-task mean. The rule: the long schedule where that gain exceeds `--threshold` points at some budget (a task
whose own gain is within the threshold at every size may stay short: `per_task`). Writes OUT/length_decision.json and
prints its table; tasks missing a run at either length are listed as missing and left out of the ensembles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtp.compare.allocation import Choice, best_allocation  # noqa: E402


def read(folder: Path, task: str, method: str, size: float) -> dict[str, Any] | None:
    """A finished single-task run's results, or None."""
    path = folder / f"st-{task}-{method}-{size:g}.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("finished") else None


def decide(short: Path, long: Path, method: str, sizes: list[float], budgets: list[float], tasks: list[str],
           threshold: float) -> dict[str, Any]:
    """The per-run table, the ensembles at each budget and the decision."""
    rows, missing = [], []
    by_length: dict[str, dict[str, list[Choice]]] = {"short": {}, "long": {}}
    dense_blocks = None
    for task in tasks:
        for size in sizes:
            pair = {"short": read(short, task, method, size), "long": read(long, task, method, size)}
            if any(r is None for r in pair.values()):
                lacking = "".join(f" ({k})" for k, r in pair.items() if r is None)
                missing.append(f"st-{task}-{method}-{size:g}{lacking}")
                continue
            row = {"task": task, "size": size}
            for length, results in pair.items():
                row[f"{length}_steps"] = results["steps"]
                row[f"{length}_score"] = results["mean_score"]
                dense_blocks = results["pruning"]["dense_blocks"]
                by_length[length].setdefault(task, []).append(Choice(
                    size=results["pruning"]["kept_blocks"], score=results["mean_score"], label=f"{task}@{size:g}"))
            row["gain"] = row["long_score"] - row["short_score"]
            rows.append(row)
    complete = [t for t in tasks if all(t in by_length[length] and len(by_length[length][t]) == len(sizes)
                                        for length in by_length)]
    ensembles = []
    for budget in budgets:
        entry: dict[str, Any] = {"budget": budget, "tasks": complete}
        for length in ("short", "long"):
            best = None if dense_blocks is None or not complete else best_allocation(
                [by_length[length][t] for t in complete], int(budget * dense_blocks))
            entry[length] = None if best is None else {"mean": best[1], "members": [c.label for c in best[0]]}
        if entry["short"] and entry["long"]:
            entry["gain"] = entry["long"]["mean"] - entry["short"]["mean"]
        ensembles.append(entry)
    gains = [e["gain"] for e in ensembles if "gain" in e]
    per_task = {t: "long" if any(r["gain"] > threshold for r in rows if r["task"] == t) else "short"
                for t in complete}
    decision = None if len(complete) < len(tasks) or not gains else ("long" if max(gains) > threshold else "short")
    return {"method": method, "sizes": sizes, "threshold": threshold, "runs": rows, "missing": missing,
            "ensembles": ensembles, "decision": decision, "per_task": per_task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=Path, required=True, help="kept results of the short single-task runs")
    parser.add_argument("--long", type=Path, required=True, help="kept results of the long single-task runs")
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "stsb", "cola", "sst2"])
    parser.add_argument("--threshold", type=float, default=1.0, help="points of five-task mean")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = decide(args.short, args.long, args.method, args.sizes, args.budgets, args.tasks, args.threshold)
    for r in out["runs"]:
        print(f"{r['task']:5s} {r['size']:<5g} {r['short_steps']:>5} steps {r['short_score']:6.2f}   "
              f"{r['long_steps']:>5} steps {r['long_score']:6.2f}   gain {r['gain']:+.2f}")
    for e in out["ensembles"]:
        if "gain" in e:
            print(f"B = {e['budget']:g}: best ensemble {e['short']['mean']:.2f} short, {e['long']['mean']:.2f} long "
                  f"({e['gain']:+.2f}; {', '.join(e['long']['members'])})")
        else:
            print(f"B = {e['budget']:g}: no ensemble of the studied sizes fits")
    print("missing:", ", ".join(out["missing"]) or "none")
    print("decision:", out["decision"], "| per task:", out["per_task"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "length_decision.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

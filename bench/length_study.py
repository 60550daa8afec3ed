"""Quality against schedule length: the mean dev score of kept runs (results.json files) per method and length.

    python bench/length_study.py --dense docs/results/compare_minilm_distill/runs/mt-dense.json \
        --run magnitude=docs/results/compare_minilm_distill/1500-steps/runs/mt-magnitude-0.1.json \
        --run magnitude=docs/results/compare_minilm_distill/runs/mt-magnitude-0.1.json \
        --out docs/results/study_length

Each `--run LABEL=PATH` is one point (its length is the run's own optimizer steps); runs of one label form a line.
Writes OUT/mean_vs_steps.json (every point: steps, mean, mean over the dense mean, per-task scores) and
OUT/mean_vs_steps.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_point(label: str, path: Path, dense_mean: float) -> dict[str, Any]:
    """One kept run as a point of the study."""
    results = json.loads(path.read_text())
    if not results.get("finished"):
        raise SystemExit(f"length_study: {path}: the run is not finished (step {results.get('steps')})")
    pruning = results.get("pruning") or {}
    return {"label": label, "run": path.stem, "file": str(path), "steps": results["steps"],
            "budget": pruning.get("budget_fraction"), "kept_fraction": pruning.get("kept_fraction"),
            "mean": results["mean_score"], "of_dense": results["mean_score"] / dense_mean,
            "scores": {task: entry["score"] for task, entry in results["tasks"].items()}}


def plot(points: list[dict[str, Any]], dense_mean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(p["label"] for p in points):
        line = sorted((p for p in points if p["label"] == label), key=lambda p: p["steps"])
        ax.plot([p["steps"] for p in line], [p["mean"] for p in line], marker="o", label=label)
    ax.axhline(dense_mean, color="grey", linestyle="--", label=f"dense {dense_mean:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("optimizer steps of the pruned run")
    ax.set_ylabel("mean dev score (five tasks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, required=True, help="the dense run's results.json (the reference)")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dense_mean = json.loads(args.dense.read_text())["mean_score"]
    points = []
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not label:
            raise SystemExit(f"length_study: --run {item!r}: give LABEL=PATH")
        points.append(read_point(label, Path(path), dense_mean))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"dense": {"file": str(args.dense), "mean": dense_mean}, "points": points}
    (args.out / "mean_vs_steps.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(points, dense_mean, args.out / "mean_vs_steps.png")
    for p in points:
        print(f"{p['label']:>28} {p['steps']:>6} steps  mean {p['mean']:6.2f}  of dense {p['of_dense']:.3f}")


if __name__ == "__main__":
    main()

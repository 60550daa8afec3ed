"""`mtp compare`: one multitask-pruned encoder against the best ensemble of single-task pruned encoders.

For each method and budget B (a fraction of one encoder's block parameters) it trains the multitask
model pruned to B, and each task alone over a grid of sizes b; then it finds, per B, the allocation
(b_1..b_T) from the grid with sum of kept parameters <= B and the highest mean dev score, and the equal
split B/T. Every run is an ordinary `launch.sh` job with its own output dir: finished runs are reused,
stopped ones resumed, and several `mtp compare` processes (on several machines sharing the output dir)
split the runs between them through claim files.
"""

from __future__ import annotations

from mtp.compare.allocation import Choice, best_allocation
from mtp.compare.command import compare, describe_plan
from mtp.compare.config import CompareConfig, load_compare_config
from mtp.compare.plan import ComparePlan, RunSpec, plan_runs
from mtp.compare.report import build_report, render_markdown, write_report
from mtp.compare.runner import run_all, start_run
from mtp.compare.store import finished_results, recipe_fingerprint, set_aside_if_stale

__all__ = ["Choice", "CompareConfig", "ComparePlan", "RunSpec", "best_allocation", "build_report", "compare",
           "describe_plan", "finished_results", "load_compare_config", "plan_runs", "recipe_fingerprint",
           "render_markdown", "run_all", "set_aside_if_stale", "start_run", "write_report"]

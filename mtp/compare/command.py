"""`mtp compare`: check the plan, train what is missing, write the report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mtp.checks import check_experiment
from mtp.compare.config import load_compare_config
from mtp.compare.plan import ComparePlan
from mtp.compare.report import write_report
from mtp.compare.runner import run_all
from mtp.config import ConfigError, load_config
from mtp.schema import resolve_path


def compare(config: str | Path, overrides: list[str], parallel: int = 1, only: str | None = None,
            report_only: bool = False) -> Path:
    """Check one multitask and one single-task run of the plan (exit 2 on errors before anything trains), train the
    runs not finished yet (those matching `only`), and write the report; returns report.md."""
    cfg = load_compare_config(config, overrides)
    base = Path(cfg.base) if Path(cfg.base).is_file() else resolve_path(cfg.base, f"{config}: base")
    plan = ComparePlan.build(cfg, base)
    if "low_resource_tasks" in cfg.model_fields_set:
        unknown = [t for t in cfg.low_resource_tasks if t not in plan.tasks]
        if unknown:
            raise ConfigError(f"{config}: low_resource_tasks: {unknown[0]!r} is not a task of {cfg.base}")
    for spec in (plan.runs[0], next(s for s in plan.runs if s.task is not None)):
        run_overrides = [*cfg.overrides, *spec.overrides, "output_dir=/nonexistent/mtp-check"]
        if spec.method != "none":
            smallest = min(cfg.budgets + cfg.single_task_sizes)
            run_overrides += [f"pruning.method={spec.method}", f"pruning.budget={smallest}"]
        check_experiment(load_config(base, run_overrides), cfg.nproc, resume=False)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "compare.yaml").write_text(Path(config).read_text())
    if not report_only:
        status = run_all(plan, parallel=parallel, only=only)
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        if failed:
            print(f"mtp compare: {len(failed)} runs failed: {', '.join(failed)} (see their launch.log)",
                  file=sys.stderr)
    command = " ".join(["mtp compare --config", shlex.quote(str(config)), *map(shlex.quote, overrides)])
    return write_report(plan, command)

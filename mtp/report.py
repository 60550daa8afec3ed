"""The final summary table printed by rank 0."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from mtp.config import ExperimentConfig


def print_summary(results: dict[str, Any], cfg: ExperimentConfig, console: Console | None = None) -> None:
    """Dev scores per task and their mean, with how far training went."""
    console = console or Console(width=None if Console().is_terminal else 110)
    if not results.get("finished"):
        console.print(f"[yellow]stopped at step {results['steps']} of {results['max_steps']}; "
                      f"resume with --resume (checkpoints in {cfg.output_dir}/checkpoints)[/yellow]")
        return
    table = Table(title=f"dev scores after {results['steps']} steps ({results['tokens_seen']:,} tokens, "
                        f"{results['wall_time_s']:.0f} s)")
    table.add_column("task")
    table.add_column("metrics")
    table.add_column("score", justify="right")
    for name, res in results["tasks"].items():
        parts = []
        for split, metrics in res["dev"].items():
            prefix = "" if split == "dev" else f"{split} "
            parts += [f"{prefix}{k} {v:.1f}" for k, v in metrics.items() if k != "score"]
        table.add_row(name, ", ".join(parts), f"{res['score']:.2f}")
    table.add_row("mean", "", f"{results['mean_score']:.2f}", style="bold")
    console.print(table)
    if cfg.train.max_steps:
        console.print(f"training was capped at train.max_steps={cfg.train.max_steps} optimizer steps "
                      f"(global batch {cfg.train.micro_batch_size * cfg.train.grad_accum * results['world_size']})")
    console.print(f"results: {cfg.output_dir}/results.json   tensorboard --logdir {cfg.output_dir}/tensorboard")

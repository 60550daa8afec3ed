"""Logging as hooks on the trainer's events, in a small registry: TensorBoard, results.json and the progress bar.
They run on rank 0 (`mtp.training.components` builds the ones `train.loggers` names there); every other hook's
metrics reach them through `on_log`.

A logger is a `Hook` and a factory `(cfg, ds_config) -> Hook` registered under a name with `@register_logger`:

    @register_logger("jsonl")
    def _jsonl(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Hook:
        return JsonLinesLogger(Path(cfg.output_dir) / "log.jsonl")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtp.config import ConfigError, ExperimentConfig, dump_config
from mtp.hooks import Hook
from mtp.run_folder import write_results

LoggerFactory = Callable[[ExperimentConfig, dict[str, Any]], Hook]
LOGGERS: dict[str, LoggerFactory] = {}


def register_logger(name: str) -> Callable[[LoggerFactory], LoggerFactory]:
    """Register a logger factory under `name` (what `train.loggers` lists)."""
    def add(factory: LoggerFactory) -> LoggerFactory:
        if name in LOGGERS and LOGGERS[name] is not factory:
            raise ValueError(f"logger {name!r} is already registered")
        LOGGERS[name] = factory
        return factory
    return add


def check_loggers(names: list[str]) -> None:
    """Refuse, in one line, a `train.loggers` entry that names no registered logger."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"train.loggers: unknown logger {unknown[0]!r} (one of {', '.join(LOGGERS)})")


def build_loggers(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> list[Hook]:
    """The loggers `train.loggers` names, in that order (rank 0 only: the caller decides)."""
    check_loggers(cfg.train.loggers)
    return [LOGGERS[name](cfg, ds_config) for name in cfg.train.loggers]


class TensorBoardLogger(Hook):
    """Every log step's scalars, the dev metrics of every evaluation, and the config as text."""

    name = "tensorboard"

    def __init__(self, folder: Path, config_yaml: str, ds_config: dict[str, Any]):
        self.folder, self.config_yaml, self.ds_config = folder, config_yaml, ds_config
        self.writer: Any = None

    def on_train_start(self, step: int, max_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder), purge_step=step or None)
        if step == 0:
            self.writer.add_text("config", "```yaml\n" + self.config_yaml + "\n```")
            self.writer.add_text("deepspeed_config", "```json\n" + json.dumps(self.ds_config, indent=2) + "\n```")

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def on_evaluate(self, step: int, results: dict[str, Any]) -> None:
        for name, res in results.items():
            for split, metrics in res["dev"].items():
                for key, value in metrics.items():
                    self.writer.add_scalar(f"dev/{name}/{split}/{key}", value, step)
        self.writer.add_scalar("dev/mean_score", sum(r["score"] for r in results.values()) / len(results), step)
        self.writer.flush()

    def on_results(self, results: dict[str, Any]) -> None:
        self.writer.close()


class ResultsFile(Hook):
    """results.json in the run folder: written when the loop ends, finished or stopped."""

    name = "results"

    def __init__(self, folder: Path):
        self.folder = folder

    def on_results(self, results: dict[str, Any]) -> None:
        write_results(self.folder, results)


class ProgressBar(Hook):
    """A tqdm bar over the optimizer steps with the last window's loss, tokens/s and task mix, on a terminal. Where
    the output goes to a file (a scheduler's log), a bar's carriage-return redraws would pile up in one line there:
    one plain line per log step instead."""

    name = "progress"

    def __init__(self, stop_after_steps: int | None = None, stream: Any = None):
        self.stop_after_steps = stop_after_steps
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        self.max_steps = 0

    def on_train_start(self, step: int, max_steps: int) -> None:
        from tqdm import tqdm

        self.max_steps = max_steps
        if self.stream.isatty():
            self.bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True, desc="train", unit="step",
                            file=self.stream)
        stop_at = min(max_steps, self.stop_after_steps or max_steps)
        if stop_at < max_steps:
            self._line(f"stopping after step {stop_at} of {max_steps} (train.stop_after_steps)")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_optimizer_step(self, model: Any, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        mix = " ".join(f"{tag.rsplit('/', 1)[1]}:{int(value)}" for tag, value in scalars.items()
                       if tag.startswith("train/batches/"))
        status = f"loss={scalars['train/loss']:.3f} tok/s={scalars['train/tokens_per_s']:.0f} mix[{mix}]"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
        else:
            self._line(f"train: step {step}/{self.max_steps} {status}")

    def on_results(self, results: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


@register_logger("tensorboard")
def _tensorboard(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Hook:
    return TensorBoardLogger(Path(cfg.output_dir) / "tensorboard", dump_config(cfg), ds_config)


@register_logger("results")
def _results(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Hook:
    return ResultsFile(Path(cfg.output_dir))


@register_logger("progress")
def _progress(cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Hook:
    return ProgressBar(cfg.train.stop_after_steps)

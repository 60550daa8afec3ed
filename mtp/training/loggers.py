"""Logging as hooks on the trainer's events: TensorBoard, results.json and the progress bar. They run on rank 0
(the trainer adds them there); every other hook's metrics reach them through `on_log`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtp.hooks import Hook


class TensorBoardLogger(Hook):
    """Every log step's scalars, the dev metrics of every evaluation, and the config as text."""

    name = "tensorboard"

    def __init__(self, folder: Path, config_yaml: str, ds_config: dict[str, Any]):
        self.folder, self.config_yaml, self.ds_config = folder, config_yaml, ds_config
        self.writer: Any = None

    def on_train_start(self, step: int) -> None:
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
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "results.json").write_text(json.dumps(results, indent=2))


class ProgressBar(Hook):
    """A tqdm bar over the optimizer steps with the last window's loss, tokens/s and task mix."""

    name = "progress"

    def __init__(self, total: int, stop_at: int):
        self.total, self.stop_at = total, stop_at
        self.bar: Any = None

    def on_train_start(self, step: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, desc="train", unit="step")
        if self.stop_at < self.total:
            self.bar.write(f"stopping after step {self.stop_at} of {self.total} (train.stop_after_steps)")

    def on_optimizer_step(self, model: Any, step: int) -> None:
        self.bar.update(1)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        mix = " ".join(f"{tag.rsplit('/', 1)[1]}:{int(value)}" for tag, value in scalars.items()
                       if tag.startswith("train/batches/"))
        self.bar.set_postfix_str(f"loss={scalars['train/loss']:.3f} tok/s={scalars['train/tokens_per_s']:.0f} "
                                 f"mix[{mix}]", refresh=False)

    def on_results(self, results: dict[str, Any]) -> None:
        self.bar.close()

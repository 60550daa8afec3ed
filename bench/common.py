"""What the benchmarks share: pre-drawn multitask batches, the base model, alternating timed rounds."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtp.config import ExperimentConfig, cache_dir  # noqa: E402
from mtp.data import MultitaskSampler, load_tasks, task_probabilities, tokenize_task  # noqa: E402
from mtp.evaluation import collate  # noqa: E402
from mtp.model import MultitaskModel, load_encoder, load_tokenizer  # noqa: E402

Step = Callable[[str, dict[str, torch.Tensor]], None]


def draw_batches(cfg: ExperimentConfig, count: int) -> tuple[list[tuple[str, dict[str, torch.Tensor]]], list]:
    """`count` multitask training micro-batches (task, padded batch), as the trainer's sampler draws them."""
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    tasks = load_tasks(cfg)
    tok_id = f"{cfg.encoder.tokenizer or cfg.encoder.name}:{type(tokenizer).__name__}"
    data = {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache_dir(cfg) / "tokenized", tok_id)["train"]
            for t in tasks}
    sizes = {t.name: len(t.train_texts) for t in tasks}
    sampler = MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, 1, 0)
    batches = []
    for _ in range(count):
        task, rows = sampler.next()
        batches.append((task, collate(data[task], rows, tokenizer)))
    return batches, tasks


def base_model(cfg: ExperimentConfig, tasks: list) -> MultitaskModel:
    torch.manual_seed(cfg.train.seed)
    encoder = load_encoder(cfg.encoder.name, cfg.encoder.random_init, cfg.encoder.config_overrides)
    return MultitaskModel(encoder, {t.name: t.num_labels for t in tasks}, cfg.encoder.pooling,
                          cfg.encoder.head_dropout).train()


def time_paths(paths: dict[str, Step], batches: list, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each path; rounds alternate between paths so that machine drift hits all alike."""
    for step in paths.values():
        for task, batch in batches[:warmup]:
            step(task, batch)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, step in paths.items():
            start = time.perf_counter()
            for task, batch in batches[warmup:]:
                step(task, batch)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def fastest(values: list[float]) -> float:
    """The quickest round: on a shared machine noise only ever adds time, so the minimum is the cost."""
    return min(values)


def machine() -> dict[str, Any]:
    import platform

    return {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpus": os.cpu_count()}

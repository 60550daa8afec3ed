"""Batches and evaluation: dynamic padding of tokenized rows, and every task's dev metrics with each rank scoring
its share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtp.data import TaskData, eval_shard
from mtp.metrics import compute_metrics, task_score


def collate(split: Any, rows: list[int] | np.ndarray, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Dynamic padding of the given rows of a tokenized split."""
    batch = split[[int(i) for i in rows]]
    labels = torch.tensor(batch.pop("labels"))
    features = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    padded = tokenizer.pad(features, return_tensors="pt")
    padded["labels"] = labels
    return dict(padded)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def dev_halves(rows: int) -> np.ndarray:
    """The first of two fixed halves of a dev set (a seeded permutation, the same for every run and seed): the
    comparison chooses its best ensemble on one half and scores it on the other."""
    first = np.zeros(rows, dtype=bool)
    first[np.random.default_rng(0).permutation(rows)[: rows // 2]] = True
    return first


@torch.no_grad()
def evaluate_tasks(forward: Any, tasks: list[TaskData], data: dict[str, dict[str, Any]], tokenizer: Any,
                   batch_size: int, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                   ) -> dict[str, Any]:
    """Dev metrics of `forward(task, **batch)` on every task; with world > 1 each rank scores its share."""
    results: dict[str, Any] = {}
    for task in tasks:
        splits, halves = {}, {}
        for split in task.dev:
            ds = data[task.name][f"dev_{split}"]
            lengths = [len(x) for x in ds["input_ids"]]
            local_idx: list[int] = []
            local_pred: list[float] = []
            for rows in eval_shard(lengths, batch_size, rank, world):
                batch = to_device(collate(ds, rows, tokenizer), torch.device(device))
                batch.pop("labels")
                logits = forward(task.name, **batch)["logits"]
                pred = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
                local_idx += rows
                local_pred += pred.float().cpu().tolist()
            gathered: list[Any] = [(local_idx, local_pred)]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, (local_idx, local_pred))
            preds = np.zeros(len(lengths))
            for idx, pred in gathered:
                preds[idx] = pred
            labels = np.array(ds["labels"])
            splits[split] = compute_metrics(task.metric, preds, labels)
            if len(labels) >= 4:  # a half of one row has no metric
                first = dev_halves(len(labels))
                halves[split] = [compute_metrics(task.metric, preds[part], labels[part])["score"]
                                 for part in (first, ~first)]
        results[task.name] = {"dev": splits, "score": task_score(splits)}
        if halves and len(halves) == len(splits):
            results[task.name]["halves"] = [float(np.mean([h[i] for h in halves.values()])) for i in (0, 1)]
    return results

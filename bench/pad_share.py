"""Pad tokens per training micro-batch: the share of each micro-batch's positions that are padding, as the trainer's
sampler draws them, with plain shuffling and with `train.length_buckets` (rows of like length batched together).

    MTP_GLUE_DIR=/path/to/glue python bench/pad_share.py [--draws 4000] [--buckets 0 4 16 64]

Recipes: the default job (configs/default.yaml) and the GPU recipes' batch shape (configs/bert_base_glue.yaml:
micro-batch 32, 128 tokens) over the GLUE tasks on disk (its MNLI, QQP and QNLI are hub-only), tokenized with the
default encoder's tokenizer (the bert-base-uncased WordPiece vocabulary; checked by its size). A micro-batch pads to
its longest row (dynamic padding), so the share is 1 - real tokens / (rows x longest row). No training: the figure
says what the encoder computes on padding, not what bucketing does to the scores.
Writes bench/results/pad_share.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine  # noqa: E402

from mtp.config import load_config  # noqa: E402
from mtp.data import MultitaskSampler, load_tasks, task_probabilities, tokenize_tasks, train_lengths  # noqa: E402
from mtp.model import load_tokenizer  # noqa: E402

LOCAL_TASKS = ["rte", "mrpc", "stsb", "cola", "sst2"]
RECIPES = {
    "default_job": ("configs/default.yaml", []),
    "gpu_recipe_batch": ("configs/bert_base_glue.yaml",
                         ["encoder.name=sentence-transformers/all-MiniLM-L6-v2",
                          f"tasks={json.dumps([{'name': t} for t in LOCAL_TASKS])}"]),
}


def pad_shares(lengths: dict[str, np.ndarray], probs: dict[str, float], micro_batch: int, buckets: int, draws: int,
               seed: int) -> dict[str, float]:
    """Overall and per-task pad share over `draws` micro-batches of the sampler."""
    sizes = {k: len(v) for k, v in lengths.items()}
    sampler = MultitaskSampler(sizes, probs, micro_batch, 0, 1, seed, lengths, buckets)
    real = dict.fromkeys(sizes, 0)
    padded = dict.fromkeys(sizes, 0)
    for _ in range(draws):
        task, rows = sampler.next()
        row_lengths = lengths[task][rows]
        real[task] += int(row_lengths.sum())
        padded[task] += len(rows) * int(row_lengths.max())
    out = {"all": round(1 - sum(real.values()) / sum(padded.values()), 4)}
    out |= {task: round(1 - real[task] / padded[task], 4) for task in sizes if padded[task]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--buckets", type=int, nargs="+", default=[0, 4, 16, 64])
    parser.add_argument("--out", default="bench/results/pad_share.json")
    args = parser.parse_args()
    rows = []
    for recipe, (path, overrides) in RECIPES.items():
        cfg = load_config(path, overrides)
        tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
        tasks = load_tasks(cfg)
        data = tokenize_tasks(cfg, tasks, tokenizer)
        lengths = {t.name: train_lengths(data[t.name]["train"]) for t in tasks}
        probs = task_probabilities(cfg, {k: len(v) for k, v in lengths.items()})
        for buckets in args.buckets:
            shares = pad_shares(lengths, probs, cfg.train.micro_batch_size, buckets, args.draws, cfg.train.seed)
            rows.append({"recipe": recipe, "config": path, "micro_batch": cfg.train.micro_batch_size,
                         "max_seq_len": cfg.data.max_seq_len, "length_buckets": buckets, "pad_share": shares["all"],
                         "pad_share_per_task": {k: v for k, v in shares.items() if k != "all"},
                         "tokenizer_vocab": len(tokenizer)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"benchmark": "pad_share", "command": " ".join(["python bench/pad_share.py", *sys.argv[1:]]),
              "draws": args.draws, **machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

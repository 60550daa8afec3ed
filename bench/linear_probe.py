"""Whether a finished run's encoder still carries a task: a ridge probe on its pooled vectors against its own head.

    python bench/linear_probe.py RUN_DIR [RUN_DIR ...] [--tasks stsb cola] [--train-rows 3000] [--one-shot-keep 0.1]

Each RUN_DIR is a finished run (its `final/`, pruning folded in). The encoder's pooled vectors (the run's own
pooling) of the first --train-rows training examples of the task fit a ridge map (scikit-learn's RidgeCV, the
penalty chosen by its leave-one-out error); the map and the run's trained head are both scored on the task's dev
set with the task's metric. A head far below its probe is a head (or training) problem; a probe as low as its head
means the encoder itself has lost the task. Regression tasks fit a ridge regressor, classification tasks a ridge
classifier. --one-shot-keep F also probes each run with every prunable matrix cut at once to its F largest |W|
(per matrix, no retraining): what the encoder keeps of a task at that size before training recovers anything.
Rows are merged into bench/results/linear_probe.json by (run, task); rows of other runs are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import machine
from sklearn.linear_model import RidgeClassifierCV, RidgeCV

from mtp.data import load_tasks
from mtp.metrics import compute_metrics
from mtp.model import MultitaskModel, load_tokenizer
from mtp.pruning import prunable_modules
from mtp.run_folder import build_dense_model, read_final

ALPHAS = np.logspace(-3, 3, 13)


@torch.no_grad()
def pooled_and_head(model: MultitaskModel, tokenizer, texts: list[tuple[str, ...]], task: str, max_len: int,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The pooled vectors of `texts` and the task head's outputs on them."""
    pooled_parts, head_parts = [], []
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        pairs = [t[1] for t in batch] if len(batch[0]) > 1 else None
        encoded = tokenizer([t[0] for t in batch], pairs, truncation=True, max_length=max_len, padding=True,
                            return_tensors="pt")
        pooled, _ = model.encode(encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids"))
        pooled_parts.append(pooled.float())
        head_parts.append(model.heads[task](pooled).float())
    return torch.cat(pooled_parts).numpy(), torch.cat(head_parts).numpy()


@torch.no_grad()
def one_shot_magnitude(model: MultitaskModel, keep: float) -> None:
    """Zero all but the `keep` fraction of largest-|W| entries of every prunable matrix (per matrix)."""
    for _, _, module in prunable_modules(model):
        weight = module.weight
        kept = max(1, int(round(keep * weight.numel())))
        threshold = weight.abs().flatten().kthvalue(weight.numel() - kept + 1).values
        weight.mul_((weight.abs() >= threshold).to(weight.dtype))


def probe_run(run_dir: Path, task: str, train_rows: int, one_shot_keep: float | None = None) -> dict:
    """Probe and head scores of one finished run on `task` (one-shot magnitude-pruned to `one_shot_keep` first)."""
    cfg, meta, state = read_final(run_dir)
    model = build_dense_model(cfg, meta, state).eval()
    if one_shot_keep is not None:
        one_shot_magnitude(model, one_shot_keep)
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    data = {t.name: t for t in load_tasks(cfg)}.get(task)
    if data is None:
        raise SystemExit(f"linear_probe: {run_dir}: the run has no task {task!r}")
    regression = model.outputs[task] == 1
    max_len = cfg.data.max_seq_len
    train_x, _ = pooled_and_head(model, tokenizer, data.train_texts[:train_rows], task, max_len)
    train_y = np.asarray(data.train_labels[:train_rows], dtype=float if regression else int)
    dev_texts, dev_labels = next(iter(data.dev.values()))
    dev_x, head_out = pooled_and_head(model, tokenizer, dev_texts, task, max_len)
    probe = (RidgeCV if regression else RidgeClassifierCV)(alphas=ALPHAS).fit(train_x, train_y)
    head_pred = head_out[:, 0] if regression else head_out.argmax(1)
    labels = np.asarray(dev_labels)
    score = {"head": compute_metrics(data.metric, head_pred, labels),
             "probe": compute_metrics(data.metric, probe.predict(dev_x), labels)}
    name = run_dir.name if one_shot_keep is None else f"{run_dir.name}, one-shot magnitude to {one_shot_keep:g}"
    return {"run": name, "task": task, "train_rows": len(train_y), "dev_rows": len(dev_labels),
            "probe_alpha": float(probe.alpha_), "pooled_std": float(dev_x.std(0).mean()), **score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["stsb"])
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--one-shot-keep", type=float, nargs="*", default=[],
                        help="also probe each run one-shot magnitude-pruned to these fractions of every matrix")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for run_dir in args.runs:
        for keep in [None, *args.one_shot_keep]:
            for task in args.tasks:
                rows.append(probe_run(run_dir, task, args.train_rows, keep))
                print(json.dumps(rows[-1]))
    done = {(r["run"], r["task"]) for r in rows}
    earlier = json.loads(args.out.read_text()).get("runs", []) if args.out.is_file() else []
    kept = [r for r in earlier if (r["run"], r.get("task", "stsb")) not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "runs": kept + rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

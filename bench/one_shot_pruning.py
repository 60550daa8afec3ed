"""How fragile a trained encoder is: dev scores after one-shot pruning, random against magnitude, no retraining.

    python bench/one_shot_pruning.py RUN_DIR [--fractions 0.02 0.1 0.25 0.5 0.75] [--seeds 2]

RUN_DIR is a finished dense run (its `final/`). Every prunable matrix loses the given fraction of its
entries, chosen at random or by smallest |W| (per matrix, as `pruning.scope=per_matrix`); the model is
scored on every task's dev set as trained. It tells how much of a pruned run's loss is the mask's choice
and how much is the recovery that training must do. Writes bench/results/one_shot_pruning.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import machine

from mtp.config import cache_dir
from mtp.data import load_tasks, tokenize_task
from mtp.export import build_dense_model, read_final
from mtp.model import load_tokenizer
from mtp.pruning import prunable_modules
from mtp.train import evaluate_tasks


def prune_(weights: list[torch.Tensor], originals: list[torch.Tensor], how: str, fraction: float, seed: int) -> None:
    """Set each weight to its original with `fraction` of its entries zeroed, at random or by smallest |W|."""
    generator = torch.Generator().manual_seed(seed)
    for weight, original in zip(weights, originals, strict=True):
        criterion = torch.rand(original.shape, generator=generator) if how == "random" else original.abs()
        drop = int(round(fraction * original.numel()))
        keep = criterion > criterion.flatten().kthvalue(drop).values if drop else torch.ones_like(original, dtype=bool)
        weight.copy_(original * keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, default=2, help="random masks drawn per fraction")
    parser.add_argument("--out", default="bench/results/one_shot_pruning.json")
    args = parser.parse_args()

    cfg, meta, state = read_final(Path(args.run_dir))
    tokenizer = load_tokenizer(cfg.encoder)
    tasks = load_tasks(cfg)
    tok_id = f"{cfg.encoder.tokenizer or cfg.encoder.name}:{type(tokenizer).__name__}"
    data = {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache_dir(cfg) / "tokenized", tok_id)
            for t in tasks}
    model = build_dense_model(cfg, meta, state)
    weights = [module.weight.data for _, _, module in prunable_modules(model)]
    originals = [w.clone() for w in weights]

    def scores() -> dict[str, float]:
        result = evaluate_tasks(model, tasks, data, tokenizer, cfg.train.eval_batch_size)
        per_task = {name: round(r["score"], 2) for name, r in result.items()}
        return per_task | {"mean": round(statistics.mean(per_task.values()), 2)}

    rows = [{"how": "none", "fraction_pruned": 0.0, "scores": scores()}]
    print(rows[-1], flush=True)
    for fraction in args.fractions:
        for how, seeds in (("magnitude", [0]), ("random", range(args.seeds))):
            for seed in seeds:
                prune_(weights, originals, how, fraction, seed)
                rows.append({"how": how, "fraction_pruned": fraction, "seed": seed, "scores": scores()})
                print(rows[-1], flush=True)
    report = {"benchmark": "one_shot_pruning", "run_dir": args.run_dir, "encoder": cfg.encoder.name,
              "tasks": [t.name for t in tasks], "per_matrix": True, **machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

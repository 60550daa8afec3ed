"""How fragile a trained encoder is: dev scores after one-shot pruning, random against magnitude, no retraining.

    python bench/one_shot_pruning.py RUN_DIR [--fractions 0.02 0.1 0.25 0.5 0.75] [--seeds 2]
                                     [--scores-from MOVEMENT_RUN_DIR]

RUN_DIR is a finished dense run (its `final/`). Every prunable matrix loses the given fraction of its
entries, chosen at random or by smallest |W| (per matrix, as `pruning.scope=per_matrix`); the model is
scored on every task's dev set as trained. It tells how much of a pruned run's loss is the mask's choice
and how much is the recovery that training must do. With --scores-from, the masks that a finished
movement run's scores give at each fraction are applied to this model too, and the output rows that those
scores prune most at the smallest fraction are listed (`movement_rows`): where movement pruning starts.
Writes bench/results/one_shot_pruning.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import machine

from mtp.data import load_tasks, tokenize_tasks
from mtp.evaluation import evaluate_tasks
from mtp.model import load_tokenizer
from mtp.pruning import prunable_modules
from mtp.run_folder import build_dense_model, read_final


def prune_(weights: list[torch.Tensor], originals: list[torch.Tensor], how: str, fraction: float, seed: int,
           scores: list[torch.Tensor] | None = None) -> None:
    """Set each weight to its original with `fraction` of its entries zeroed: at random, by smallest |W|, or
    by smallest movement score (`scores`, one per weight)."""
    generator = torch.Generator().manual_seed(seed)
    for i, (weight, original) in enumerate(zip(weights, originals, strict=True)):
        if how == "movement":
            assert scores is not None
            criterion = scores[i].float()
        else:
            criterion = torch.rand(original.shape, generator=generator) if how == "random" else original.abs()
        drop = int(round(fraction * original.numel()))
        keep = criterion > criterion.flatten().kthvalue(drop).values if drop else torch.ones_like(original, dtype=bool)
        weight.copy_(original * keep)


def most_pruned_rows(names: list[str], originals: list[torch.Tensor], scores: list[torch.Tensor],
                     fraction: float, top: int = 5) -> list[dict]:
    """The output rows with the largest share of their entries among each matrix's lowest-scored `fraction`."""
    rows = []
    for name, original, score in zip(names, originals, scores, strict=True):
        drop = int(round(fraction * score.numel()))
        low = score.float() <= score.float().flatten().kthvalue(drop).values
        share = low.float().mean(1)
        row_size = original.abs().sum(1)
        for r in share.topk(2).indices.tolist():
            rows.append({"matrix": name, "row": r, "share_pruned": round(float(share[r]), 3),
                         "row_abs_sum_over_median": round(float(row_size[r] / row_size.median()), 2)})
    return sorted(rows, key=lambda row: -row["share_pruned"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, default=2, help="random masks drawn per fraction")
    parser.add_argument("--scores-from", help="a finished movement run whose scores give masks too")
    parser.add_argument("--out", default="bench/results/one_shot_pruning.json")
    args = parser.parse_args()

    cfg, meta, state = read_final(Path(args.run_dir))
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    tasks = load_tasks(cfg)
    data = tokenize_tasks(cfg, tasks, tokenizer)
    model = build_dense_model(cfg, meta, state)
    found = prunable_modules(model)
    names = [f"layer.{idx}.{kind}" for kind, idx, _ in found]
    weights = [module.weight.data for _, _, module in found]
    originals = [w.clone() for w in weights]
    scores_from = None
    if args.scores_from:
        _, _, moved = read_final(Path(args.scores_from))
        path_of = {id(module): name for name, module in model.named_modules()}
        keys = [f"{path_of[id(module)]}.scores" for _, _, module in found]
        missing = [k for k in keys if k not in moved]
        if missing:
            raise SystemExit(f"{args.scores_from}: no movement scores {missing[0]!r} (not a movement run?)")
        scores_from = [moved[k] for k in keys]

    def scores() -> dict[str, float]:
        result = evaluate_tasks(model, tasks, data, tokenizer, cfg.train.eval_batch_size)
        per_task = {name: round(r["score"], 2) for name, r in result.items()}
        return per_task | {"mean": round(statistics.mean(per_task.values()), 2)}

    rows = [{"how": "none", "fraction_pruned": 0.0, "scores": scores()}]
    print(rows[-1], flush=True)
    for fraction in args.fractions:
        hows = [("magnitude", [0]), ("random", range(args.seeds))] + ([("movement", [0])] if scores_from else [])
        for how, seeds in hows:
            for seed in seeds:
                prune_(weights, originals, how, fraction, seed, scores_from)
                rows.append({"how": how, "fraction_pruned": fraction, "seed": seed, "scores": scores()})
                print(rows[-1], flush=True)
    report = {"benchmark": "one_shot_pruning", "run_dir": args.run_dir, "encoder": cfg.encoder.name,
              "tasks": [t.name for t in tasks], "per_matrix": True, **machine(), "rows": rows}
    if scores_from:
        report |= {"scores_from": args.scores_from,
                   "movement_rows": most_pruned_rows(names, originals, scores_from, min(args.fractions))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

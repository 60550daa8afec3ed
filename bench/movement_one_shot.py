"""Where movement pruning starts: one-shot masks from a movement run's scores against |W| and random masks.

    python bench/movement_one_shot.py --label NAME --config CONFIG [OVERRIDES ...] \
        [--criteria lowest_scores highest_scores smallest_abs_scores random magnitude] [--fractions 0.1] \
        [--bias-correction CRITERION ...] [--train] [--out bench/results/movement_one_shot.json]

CONFIG and OVERRIDES name a movement run that has stopped at the end of its dense phase (run it first with
`train.stop_after_steps=S train.checkpoint_every=S`, S = the first pruned step). Its last checkpoint is resumed
(with --train the dense phase is trained here instead, in a fresh output_dir, and the plain sums -sum(g * W),
the scores plain gradient descent would give, are kept beside the AdamW-trained ones). Then for each criterion
and fraction every prunable matrix loses that fraction of its entries at once (per matrix), with no retraining,
and every task's dev set is scored. Criteria: the lowest scores (what movement prunes first), the highest, the
scores nearest 0, random, the smallest |W|; the lowest scores taken as the same share of every output row or of
every input column (whether movement's harm is removals gathered in a few rows or columns); the lowest plain sums
and the plain sums nearest 0. For the criteria given to --bias-correction each matrix's bias also takes back the
removed weights' mean contribution, b += (W * (1 - M)) E[x] (E[x] over the dev inputs): how much of the harm is
a shift of the outputs' mean.
Every row gives, averaged over matrices: that shift over the mean output; the removed part's share of each
matrix's output on 4,096 dev input rows, ||(W * (1 - M)) x|| / ||W x|| (about sqrt(fraction) when the removed
contributions are independent); the removed weights' mean |W| over the matrix's. Results are kept under
`--label` in the JSON file (other labels stay).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from common import machine

from mtp.config import load_config
from mtp.training.distributed import init_distributed
from mtp.training.trainer import Trainer

CRITERIA = ("lowest_scores", "highest_scores", "smallest_abs_scores", "random", "magnitude",
            "lowest_scores_per_row", "lowest_scores_per_column", "lowest_plain_sums", "smallest_abs_plain_sums")


def criterion(name: str, weight: torch.Tensor, scores: torch.Tensor, generator: torch.Generator,
              plain: torch.Tensor | None = None) -> torch.Tensor:
    """Entries with the smallest values of the returned tensor are removed first. `plain` is -sum(g * W) over the
    dense steps: the movement score plain gradient descent would give (Sanh et al.'s analysis), not AdamW's."""
    if name in ("lowest_plain_sums", "smallest_abs_plain_sums"):
        if plain is None:
            sys.exit(f"criterion {name} needs --train (the sums are taken while the dense phase trains)")
        return plain if name == "lowest_plain_sums" else plain.abs()
    if name.startswith("lowest_scores"):
        return scores
    if name == "highest_scores":
        return -scores
    if name == "smallest_abs_scores":
        return scores.abs()
    if name == "random":
        return torch.rand(weight.shape, generator=generator)
    return weight.abs()


def removal_mask(crit: torch.Tensor, fraction: float, name: str) -> torch.Tensor:
    """1 where kept: the `fraction` of entries with the smallest criterion go, over the whole matrix, or the same
    share of every output row (`_per_row`) or of every input column (`_per_column`)."""
    mask = torch.ones_like(crit)
    if name.endswith("_per_row") or name.endswith("_per_column"):
        dim = 1 if name.endswith("_per_row") else 0
        drop = torch.topk(crit, int(fraction * crit.shape[dim]), dim=dim, largest=False).indices
        return mask.scatter_(dim, drop, 0.0)
    drop = torch.topk(crit.flatten(), int(fraction * crit.numel()), largest=False).indices
    mask.view(-1)[drop] = 0.0
    return mask


def dev_inputs(trainer: Trainer, modules: list[torch.nn.Module], rows: int = 4096) -> tuple[list, list]:
    """E[x] of every matrix's input over the dev sets of all tasks (one evaluation pass), and a sample of `rows`
    of those inputs per matrix (real tokens and padding alike, every `stride`-th row)."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    counts = [0] * len(modules)
    samples: list[list[torch.Tensor]] = [[] for _ in modules]

    def make_hook(i: int):
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[i] = x.double().sum(0) if sums[i] is None else sums[i] + x.double().sum(0)
            counts[i] += x.shape[0]
            samples[i].append(x[::97].float())
        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
    trainer.evaluate()
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(0)
    picked = []
    for rows_of_matrix in samples:
        x = torch.cat(rows_of_matrix)
        picked.append(x[torch.randperm(x.shape[0], generator=generator)[:rows]])
    return [(s / c).float() for s, c in zip(sums, counts, strict=True)], picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the name of this checkpoint's rows in the JSON file")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1])
    parser.add_argument("--bias-correction", nargs="*", choices=CRITERIA, default=[],
                        help="criteria whose masks are scored again with the mean restored")
    parser.add_argument("--train", action="store_true",
                        help="train the run's dense phase here (to train.stop_after_steps) instead of resuming it, "
                             "summing g * W of every prunable weight on the way (the *_plain_sums criteria)")
    parser.add_argument("--out", default="bench/results/movement_one_shot.json")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    if cfg.pruning.method != "movement":
        sys.exit(f"{args.config}: pruning.method must be movement (is {cfg.pruning.method})")
    rank, world, local_rank = init_distributed()
    trainer = Trainer.build(cfg, resume=not args.train, rank=rank, world=world, local_rank=local_rank)
    hook = next(h for h in trainer.hooks if h.name == "pruning")
    modules = hook.modules
    plain: list[torch.Tensor] | None = None
    if args.train:  # dL/dW of the masked weight is g * M = g while the masks are all ones (the dense phase)
        sums = [torch.zeros_like(m.weight, dtype=torch.float64) for m in modules]

        def make_sum(i: int, weight: torch.Tensor):
            def add(grad: torch.Tensor) -> None:
                sums[i].sub_((grad.detach() * weight.detach()).double())
            return add

        handles = [m.weight.register_hook(make_sum(i, m.weight)) for i, m in enumerate(modules)]
        trainer.train()
        for handle in handles:
            handle.remove()
        if not all(bool(m.mask.all()) for m in modules):
            sys.exit("--train: the masks moved before train.stop_after_steps; stop within the dense phase")
        plain = [s_.float() for s_ in sums]
    weights = [m.weight.detach().clone() for m in modules]
    biases = [m.bias.detach().clone() for m in modules]
    means, inputs = dev_inputs(trainer, modules)

    def score() -> dict[str, float]:
        per_task = {name: round(r["score"], 2) for name, r in trainer.evaluate().items()}
        return per_task | {"mean": round(statistics.mean(per_task.values()), 2)}

    rows = [{"criterion": "none", "fraction_removed": 0.0, "scores": score()}]
    print(rows[-1], flush=True)
    generator = torch.Generator().manual_seed(0)
    for fraction in args.fractions:
        for name in args.criteria:
            for corrected in (False, True) if name in args.bias_correction else (False,):
                shifts, errors = [], []
                with torch.no_grad():
                    for i, m in enumerate(modules):
                        crit = criterion(name, weights[i], m.scores.detach(), generator,
                                         None if plain is None else plain[i])
                        m.mask.copy_(removal_mask(crit, fraction, name).to(m.mask.dtype))
                        removed = weights[i] * (1 - m.mask.to(weights[i].dtype))
                        m.bias.copy_(biases[i])
                        if corrected:
                            m.bias.add_(removed @ means[i])
                        shift = (removed @ means[i]).norm() / (weights[i] @ means[i]).norm().clamp_min(1e-8)
                        shifts.append(float(shift))
                        error = (inputs[i] @ removed.T).norm() / (inputs[i] @ weights[i].T).norm().clamp_min(1e-8)
                        errors.append(float(error))
                row = {"criterion": name, "fraction_removed": fraction, "bias_corrected": corrected,
                       "scores": score(), "mean_shift_over_mean_output": round(statistics.mean(shifts), 4),
                       "output_error_over_output": round(statistics.mean(errors), 4),
                       "removed_abs_weight_over_mean": round(statistics.mean(
                           float((w.abs() * (1 - m.mask.to(w.dtype))).sum() / (1 - m.mask.to(w.dtype)).sum()
                                 / w.abs().mean()) for w, m in zip(weights, modules, strict=True)), 4)}
                rows.append(row)
                print(row, flush=True)

    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "movement_one_shot", "checkpoints": {}}
    report["checkpoints"][args.label] = {"config": args.config, "overrides": args.overrides,
                                         "step": trainer.state.step, **machine(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Step time of distillation from a dense teacher over plain training, in the same DeepSpeed engine.

    python bench/distill_overhead.py [--config configs/default.yaml] [--steps 10] [--rounds 4] [--repeats 2]

Paths (the trainer's step on the same pre-drawn batches and starting weights, 1 rank, fp32 ZeRO-0 on CPU):
dense training; with logit distillation; with logit and hidden-state (every block) distillation; and magnitude
pruning with and without both (the recipe of configs/compare_minilm_distill.yaml), and with both where each task's
logits come from a teacher of its own (distill.task_teachers: one more teacher forward per step). The teacher is
the starting model in evaluation mode (the cost does not depend on its weights). Rounds alternate between paths and each
path's cost is its quickest round; each repeat's ratios are reported too. The extra work is one forward pass of
the teacher without gradients (about a third of a training step) plus the losses.
Writes bench/results/distill_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

from common import base_model, draw_batches, fastest, machine, time_paths
from pruning_overhead import engine_step

from mtp.config import DistillConfig, load_config
from mtp.distill import Distillation
from mtp.pruning import build_pruning, pruning_settings
from mtp.training.distributed import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/distill_overhead.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    cfg = load_config(args.config, [*args.overrides, "train.deepspeed_config=ds_configs/cpu_zero0.json"])
    batches, tasks = draw_batches(cfg, args.warmup + args.steps)
    base = base_model(cfg, tasks)
    names = [t.name for t in tasks]
    teacher = copy.deepcopy(base).eval()
    logits = DistillConfig(teacher="<the starting model>", task_weight=0.5)
    both = logits.model_copy(update={"hidden_weight": 1.0})
    total = (args.warmup + args.steps * args.rounds) * args.repeats
    pruning = pruning_settings(method="magnitude", budget=args.budget, warmup_ratio=0.0, cooldown_ratio=0.0)

    per_task = both.model_copy(update={"task_teachers": {n: "<a copy of the starting model>" for n in names}})

    def path(distill: DistillConfig | None, prune: bool):
        model = copy.deepcopy(base)
        own = {n: copy.deepcopy(teacher) for n in distill.task_teachers} if distill else None
        hooks = [*(build_pruning(pruning, total) if prune else []),
                 *([Distillation(distill, names, teacher=copy.deepcopy(teacher), task_teachers=own)]
                   if distill else [])]
        for hook in hooks:
            hook.setup(model)
        return engine_step(cfg, model, hooks)

    paths = {"dense": path(None, False), "distill_logits": path(logits, False),
             "distill_logits_hidden": path(both, False), "magnitude": path(None, True),
             "magnitude_distill_logits_hidden": path(both, True),
             "magnitude_distill_task_teachers": path(per_task, True)}
    repeats = [time_paths(paths, batches, args.warmup, args.rounds) for _ in range(args.repeats)]
    seconds = {name: [s for rep in repeats for s in rep[name]] for name in paths}

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        dense = fastest(times["dense"])
        out = {name: fastest(s) / dense for name, s in times.items() if name != "dense"}
        out["distill_over_magnitude"] = fastest(times["magnitude_distill_logits_hidden"]) / fastest(times["magnitude"])
        out["task_teachers_over_one_teacher"] = (fastest(times["magnitude_distill_task_teachers"])
                                                 / fastest(times["magnitude_distill_logits_hidden"]))
        return out

    overhead = ratios(seconds)
    report = {"benchmark": "distill_overhead", "config": args.config, "encoder": cfg.encoder.name,
              "engine": "deepspeed fp32 ZeRO-0", "steps_per_round": args.steps, "rounds": args.rounds,
              "repeats": args.repeats, **machine(), "seconds_per_round": seconds, "overhead_vs_dense": overhead,
              "overhead_per_repeat": [ratios(rep) for rep in repeats]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"overhead_vs_dense": overhead}, indent=1))


if __name__ == "__main__":
    main()

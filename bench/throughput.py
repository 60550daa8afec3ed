"""Tokens/s of mtp's DeepSpeed training path against a plain PyTorch loop: same model, same batches, 1 rank.

    python bench/throughput.py [--config configs/default.yaml] [--zero 0 2] [--steps 30] [--rounds 3]

Both paths start from the same weights and run the same pre-drawn multitask batches; rounds alternate
between paths. The ratio (DeepSpeed tokens/s over plain tokens/s) uses the median round of each.
Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from common import base_model, draw_batches, machine, median, time_paths

from mtp.config import load_config
from mtp.training import zero_step
from mtp.training.distributed import init_distributed
from mtp.training.optim import build_ds_config, lr_lambda, skip_single_rank_reduction, split_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2], help="ZeRO stages of the DeepSpeed path")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="bench/results/throughput.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    init_distributed()
    cfg = load_config(args.config, args.overrides)
    batches, tasks = draw_batches(cfg, args.warmup + args.steps)
    tokens_per_round = sum(int(b["attention_mask"].sum()) for _, b in batches[args.warmup:])
    base = base_model(cfg, tasks)
    schedule = lr_lambda(10, 10_000)

    def plain_path():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(split_param_groups(model, [], cfg.train.weight_decay), lr=cfg.train.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        def step(task, batch):
            model(task, **batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        return step

    def ds_path(stage: int):
        cfg.train.deepspeed_config = f"ds_configs/cpu_zero{stage}.json"
        model = copy.deepcopy(base)
        zero_step.install()  # as the trainer does
        engine, *_ = deepspeed.initialize(model=model, config=build_ds_config(cfg, 1),
                                          model_parameters=split_param_groups(model, [], cfg.train.weight_decay),
                                          lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
        skip_single_rank_reduction(engine)  # as the trainer does

        def step(task, batch):
            engine.backward(engine(task, **batch)["loss"])
            engine.step()

        return step

    paths = {"plain_pytorch": plain_path()} | {f"deepspeed_zero{s}": ds_path(s) for s in args.zero}
    seconds = time_paths(paths, batches, args.warmup, args.rounds)
    tok_s = {name: tokens_per_round / median(s) for name, s in seconds.items()}
    report = {
        "benchmark": "throughput", "config": args.config, "encoder": cfg.encoder.name,
        "micro_batch_size": cfg.train.micro_batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "tokens_per_round": tokens_per_round, **machine(), "seconds_per_round": seconds, "tokens_per_s": tok_s,
        "ratio_vs_plain": {name: tok_s[name] / tok_s["plain_pytorch"] for name in tok_s if name != "plain_pytorch"},
        "target_ratio": 0.95,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"tokens_per_s": tok_s, "ratio_vs_plain": report["ratio_vs_plain"]}, indent=2))


if __name__ == "__main__":
    main()

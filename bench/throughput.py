"""Tokens/s of mtp's DeepSpeed training path against a plain PyTorch loop: same model, same batches, 1 rank.

    python bench/throughput.py [--config configs/default.yaml] [--steps 30] [--rounds 3] [--out FILE]

Both paths start from the same weights and run the same pre-drawn multitask batches; the rounds
alternate (plain, DeepSpeed, plain, ...) so that drift in the machine's speed hits both alike. The
ratio (DeepSpeed tokens/s over plain tokens/s) is computed from the median round of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtp.config import load_config  # noqa: E402
from mtp.data import MultitaskSampler, load_tasks, task_probabilities, tokenize_task  # noqa: E402
from mtp.model import MultitaskModel, TaskInfo, load_encoder, load_tokenizer  # noqa: E402
from mtp.train import build_ds_config, collate, init_distributed, lr_lambda, split_param_groups  # noqa: E402


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
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.encoder)
    tasks = load_tasks(cfg)
    cache = Path(os.environ.get("MTP_CACHE_DIR", "~/.cache/mtp")).expanduser() / "tokenized"
    data = {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache, cfg.encoder.name)["train"]
            for t in tasks}
    sizes = {t.name: len(t.train_texts) for t in tasks}
    sampler = MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, 1, 0)
    n_batches = args.warmup + args.steps
    batches = []
    for _ in range(n_batches):
        task, rows = sampler.next()
        batches.append((task, collate(data[task], rows, tokenizer)))
    tokens_per_round = sum(int(b["attention_mask"].sum()) for _, b in batches[args.warmup:])

    encoder = load_encoder(cfg.encoder, tokenizer.pad_token_id)
    base = MultitaskModel(encoder, [TaskInfo(t.name, t.num_labels) for t in tasks], cfg.encoder.pooling,
                          cfg.encoder.head_dropout)
    schedule = lr_lambda(10, 10_000)

    def plain_path():
        model = copy.deepcopy(base).train()
        groups = split_param_groups(model, [], cfg.train.weight_decay)
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        def step(task, batch):
            loss = model(task, **batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        return step

    def ds_path(stage: int):
        cfg.train.deepspeed_config = f"ds_configs/cpu_zero{stage}.json"
        model = copy.deepcopy(base).train()
        groups = split_param_groups(model, [], cfg.train.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=build_ds_config(cfg, 1),
                                          lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))

        def step(task, batch):
            loss = engine(task, **batch)["loss"]
            engine.backward(loss)
            engine.step()

        return step

    paths = {"plain_pytorch": plain_path()} | {f"deepspeed_zero{s}": ds_path(s) for s in args.zero}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for step in paths.values():  # warm up every path once (allocator, DeepSpeed's first-step work)
        for task, batch in batches[: args.warmup]:
            step(task, batch)
    for _ in range(args.rounds):
        for name, step in paths.items():
            start = time.perf_counter()
            for task, batch in batches[args.warmup:]:
                step(task, batch)
            seconds[name].append(time.perf_counter() - start)

    tok_s = {name: tokens_per_round / statistics.median(s) for name, s in seconds.items()}
    report = {
        "benchmark": "throughput", "config": args.config, "encoder": cfg.encoder.name,
        "micro_batch_size": cfg.train.micro_batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "tokens_per_round": tokens_per_round, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "seconds_per_round": seconds, "tokens_per_s": tok_s,
        "ratio_vs_plain": {name: tok_s[name] / tok_s["plain_pytorch"] for name in tok_s if name != "plain_pytorch"},
        "target_ratio": 0.95,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"tokens_per_s": tok_s, "ratio_vs_plain": report["ratio_vs_plain"]}, indent=2))


if __name__ == "__main__":
    main()

"""The GPU paths on one accelerator: CUDA, bf16/fp16, NCCL, ZeRO-2/3; step time and memory of BERT-base and -large.

    python bench/gpu.py [--archs bert-base-uncased bert-large-uncased] [--steps 10] [--rounds 3]
                        [--out bench/results/gpu.json] [dotted.key=value ...]

What it checks and times, each section recorded in the JSON even when another fails:
- environment: torch, CUDA, the device, bf16 support, NCCL's version, DeepSpeed's accelerator;
- collectives: all_reduce, all_gather and reduce_scatter over the process group (NCCL on a GPU);
- training: for each architecture (random weights from configs/arch/NAME, real multitask GLUE batches),
  dense steps through mtp's DeepSpeed engine under bf16 ZeRO-2, fp16 ZeRO-2 and bf16 ZeRO-3: tokens/s,
  peak GPU memory, and that the loss is finite;
- pruning: on the last architecture, bf16 ZeRO-2, each method's step against dense (rounds alternate
  between paths; the quickest round of each is its cost): magnitude, movement, rank with every gate
  open and rank with the gates beyond the budget closed; and the same rank and movement steps under
  ZeRO-3 (the hooks' gathered paths).
`--smoke` runs the same code on CPU with the tiny BERT and fp32 configs (a check of this script).
Writes one JSON file (after every section, so a stopped run keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from common import base_model, draw_batches, fastest, machine
from pruning_overhead import close_gates_to, engine_step

from mtp.config import load_config
from mtp.pruning import pruning_settings
from mtp.training.distributed import init_distributed

PRECISIONS = {"bf16_zero2": "ds_configs/gpu_bf16_zero2.json", "fp16_zero2": "ds_configs/gpu_fp16_zero2.json",
              "bf16_zero3": "ds_configs/gpu_bf16_zero3.json"}
SMOKE_PRECISIONS = {"fp32_zero2": "ds_configs/cpu_zero2.json", "fp32_zero3": "ds_configs/cpu_zero3.json"}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    env: dict[str, Any] = {**machine(), "deepspeed": deepspeed.__version__,
                           "accelerator": get_accelerator().device_name(), "backend": dist.get_backend(),
                           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "bf16_supported": torch.cuda.is_bf16_supported(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    return env


def collectives() -> dict[str, Any]:
    """The collectives ZeRO uses, on the engine's process group, checked against their exact results."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(0 if torch.cuda.is_available() else None))
    world, rank = dist.get_world_size(), dist.get_rank()
    base = torch.arange(1 << 20, dtype=torch.float32, device=device)
    x = base + rank  # rank r holds base + r: every result below is known exactly
    reduced = x.clone()
    dist.all_reduce(reduced)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    shard = torch.empty(x.numel() // world, device=device)
    dist.reduce_scatter(shard, list(x.chunk(world)))
    sync()
    offset = world * (world - 1) / 2
    return {"world_size": world,
            "all_reduce_exact": bool(torch.equal(reduced, world * base + offset)),
            "all_gather_exact": all(torch.equal(g, base + r) for r, g in enumerate(gathered)),
            "reduce_scatter_exact": bool(torch.equal(shard, world * base.chunk(world)[rank] + offset))}


def timed(step, batches: list, warmup: int, rounds: int) -> list[float]:
    """Seconds per round of `step` over the batches after the first `warmup` (synchronised on a GPU)."""
    for task, batch in batches[:warmup]:
        step(task, batch)
    seconds = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for task, batch in batches[warmup:]:
            step(task, batch)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def alternated(paths: dict[str, Any], batches: list, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each path, rounds alternating between paths."""
    seconds: dict[str, list[float]] = {name: timed(step, batches, warmup, 0) for name, step in paths.items()}
    for _ in range(rounds):
        for name, step in paths.items():
            seconds[name] += timed(step, batches, 0, 1)
    return seconds


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def finite(step) -> bool:
    return bool(torch.isfinite(step.state["loss"].float()).item())


def guarded(fn, *args) -> dict[str, Any]:
    """Run one section; an exception is recorded, not raised, so the other sections still run."""
    try:
        return fn(*args)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}


def dense_training(cfg, tasks, batches, tokens: int, args, ds_path: str) -> dict[str, Any]:
    """Dense steps of one architecture under one DeepSpeed config: tokens/s, step time, peak memory."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.train.deepspeed_config = ds_path
    reset_memory()
    step = engine_step(run_cfg, base_model(run_cfg, tasks), [])
    seconds = timed(step, batches, args.warmup, args.rounds)
    best = fastest(seconds)
    result = {"seconds_per_round": seconds, "tokens_per_s": round(tokens / best), "step_ms": 1000 * best / args.steps,
              "peak_memory_gib": peak_memory_gib(), "loss_finite": finite(step)}
    del step
    return result


def pruning_paths(cfg, tasks, batches, args, ds_path: str, methods: list[str]) -> dict[str, Any]:
    """Each pruning method's step against dense in one DeepSpeed config (rounds alternate between paths)."""
    from mtp.pruning import build_pruning

    run_cfg = cfg.model_copy(deep=True)
    run_cfg.train.deepspeed_config = ds_path
    reset_memory()
    base = base_model(run_cfg, tasks)
    if torch.cuda.is_available():
        base = base.cuda()  # the rank factorisations' SVDs run on the GPU (minutes for BERT-large on CPU)
    total = args.warmup + args.steps * (args.rounds + 1)
    paths = {"dense": engine_step(run_cfg, copy.deepcopy(base), [])}
    hooks_of: dict[str, list] = {}
    for name in methods:
        method = "rank" if name.startswith("rank") else name
        # rank as on the ramp's first half, as this bench measured it before rank's default closes lagging ranks
        # from half the ramp (its short schedule would start closing part-way through the timed steps)
        limit = {"lag_limit": None} if method == "rank" else {}
        pcfg = pruning_settings(method=method, budget=args.budget, warmup_ratio=0.0, cooldown_ratio=0.0, **limit)
        model = copy.deepcopy(base)
        hooks = build_pruning(pcfg, total)
        for hook in hooks:
            hook.setup(model)
        if name == "rank_at_budget":
            hook = hooks[0]
            close_gates_to(hook, hook.budget.target / hook.budget.dense_blocks)
        paths[name] = engine_step(run_cfg, model, hooks)
        hooks_of[name] = hooks
    del base
    seconds = alternated(paths, batches, args.warmup, args.rounds)
    dense = fastest(seconds["dense"])
    result: dict[str, Any] = {
        "seconds_per_round": seconds,
        "overhead_vs_dense": {name: fastest(s) / dense for name, s in seconds.items() if name != "dense"},
        "loss_finite": {name: finite(step) for name, step in paths.items()},
        "peak_memory_gib_all_paths": peak_memory_gib()}
    # the budget holds in the model being trained: kept fraction of the encoder blocks per method
    kept = {}
    for name, hooks in hooks_of.items():
        metrics = hooks[0].metrics()
        kept[name] = {k: v for k, v in metrics.items() if "fraction" in k or "density" in k}
    result["pruning_metrics"] = kept
    del paths
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="tasks and data of the batches")
    parser.add_argument("--archs", nargs="+", default=["bert-base-uncased", "bert-large-uncased"],
                        help="folders under configs/arch (random weights)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny BERT, fp32: check this script")
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.smoke else "cuda")
    init_distributed()
    precisions = SMOKE_PRECISIONS if args.smoke else PRECISIONS
    archs = ["tiny-bert"] if args.smoke else args.archs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "gpu", "micro_batch_size": args.micro_batch, "steps_per_round": args.steps,
                              "rounds": args.rounds, "budget": args.budget}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    report["environment"] = guarded(environment)
    report["collectives"] = guarded(collectives)
    save()
    for arch in archs:
        cfg = load_config(args.config, [f"encoder.name=configs/arch/{arch}", "encoder.random_init=true",
                                        "encoder.pooling=cls", f"train.micro_batch_size={args.micro_batch}",
                                        "train.grad_accum=1", *args.overrides])
        batches, tasks = draw_batches(cfg, args.warmup + args.steps)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        batches = [(task, {k: v.to(device) for k, v in batch.items()}) for task, batch in batches]
        tokens = sum(int(b["attention_mask"].sum()) for _, b in batches[args.warmup:])
        entry: dict[str, Any] = {"tokens_per_round": tokens, "max_seq_len": cfg.data.max_seq_len}
        report.setdefault("training", {})[arch] = entry
        for label, ds_path in precisions.items():
            entry[label] = guarded(dense_training, cfg, tasks, batches, tokens, args, ds_path)
            save()
            print(arch, label, {k: v for k, v in entry[label].items() if k != "seconds_per_round"}, flush=True)
        if arch == archs[-1]:
            first, last = list(precisions.items())[0], list(precisions.items())[-1]
            report["pruning"] = {
                "arch": arch,
                first[0]: guarded(pruning_paths, cfg, tasks, batches, args, first[1],
                                  ["magnitude", "movement", "rank", "rank_at_budget"])}
            save()
            report["pruning"][last[0]] = guarded(pruning_paths, cfg, tasks, batches, args, last[1],
                                                 ["movement", "rank_at_budget"])
            save()
            print(json.dumps({k: v.get("overhead_vs_dense", v.get("error")) for k, v in report["pruning"].items()
                              if isinstance(v, dict)}, indent=1), flush=True)
    save()


if __name__ == "__main__":
    main()

"""GPU efficiency: mtp's DeepSpeed path against a plain bf16 PyTorch loop, where a BERT-large step's time goes, and
what pruning costs over dense.

    python bench/gpu_efficiency.py                                   # one GPU: bench/results/gpu_efficiency.json
    python bench/gpu_efficiency.py --smoke --out /tmp/efficiency.json  # CPU, tiny BERT, fp32: a check of this script

Batches are packed: every row is `--seq-len` real tokens (random ids, random labels, the five GLUE heads in
turn), so tokens/s counts every position the model computes and no data is needed. Random weights from
configs/arch/. Sections, each saved as it finishes (one that fails is recorded and the others still run):
- rows: BERT-base and BERT-large at micro-batches 32 and 64: mtp's engine (the trainer's step: forward, hooks,
  backward, DeepSpeed step) under bf16 ZeRO-2 and ZeRO-3, and the plain loop on the same model and batches
  (fp32 weights, autocast to bf16, fused AdamW). step_ms is the quickest round's mean step; MFU is
  6 x parameters x tokens/s over the device's bf16 dense peak (parameters without the embedding tables, whose
  lookups are no matrix products; attention's score products left out, as in the 6N rule).
- profile: torch.profiler over dense BERT-large steps of mtp's bf16 ZeRO-2 path: the operators by self time on
  the device and on the host, and how much of the step the device is busy (also written as a Markdown table).
- pruning: BERT-large, bf16 ZeRO-2, each method's step over dense (rounds alternate between paths; the quickest
  round of each is its cost): magnitude, movement per matrix and global, rank; `ramp` while masks move every
  step (rank: every gate open, the full-rank start), `at_budget` at the final masks (rank: gates beyond the
  budget closed).
- compile: BERT-large, bf16 ZeRO-2, `train.compile` (the encoder compiled in place, dynamic shapes, as the trainer
  does) against eager on the same batches, dense and structured / magnitude at the budget (the paths whose graphs
  do not break on an accelerator's path; rank breaks, docs/gpu.md): step over eager, and the first step's seconds
  (compilation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from common import fastest
from gpu import alternated, collectives, environment, finite, guarded, peak_memory_gib, reset_memory, sync, timed
from pruning_overhead import engine_step, pruned_path

from mtp.config import load_config
from mtp.model import MultitaskModel, load_encoder
from mtp.training.distributed import init_distributed

TASKS = {"rte": 2, "mrpc": 2, "stsb": 1, "cola": 2, "sst2": 2}
DS_CONFIGS = {2: "ds_configs/gpu_bf16_zero2.json", 3: "ds_configs/gpu_bf16_zero3.json"}
SMOKE_DS_CONFIGS = {2: "ds_configs/cpu_zero2.json", 3: "ds_configs/cpu_zero3.json"}
# bf16 dense peak of the device, TFLOP/s (no sparsity), from the vendors' data sheets
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "A100": 312.0}
PRUNING_PATHS = {"magnitude": {"method": "magnitude"}, "movement": {"method": "movement"},
                 "movement_global": {"method": "movement", "scope": "global"}, "rank": {"method": "rank"}}


def peak_tflops() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None), name


def packed_batches(count: int, micro_batch: int, seq_len: int, device: str, seed: int = 0) -> list:
    """`count` micro-batches of `seq_len` real tokens per row, the tasks in turn."""
    generator = torch.Generator().manual_seed(seed)
    names = list(TASKS)
    batches = []
    for i in range(count):
        task = names[i % len(names)]
        ids = torch.randint(1000, 20000, (micro_batch, seq_len), generator=generator)
        labels = (torch.rand(micro_batch, generator=generator) * 5 if TASKS[task] == 1
                  else torch.randint(0, TASKS[task], (micro_batch,), generator=generator))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        # no row is padded, as the trainer tells the model from the host-side batch (no check of the mask's values)
        batches.append((task, {**{k: v.to(device) for k, v in batch.items()}, "padded": False}))
    return batches


def build_model(arch: str) -> MultitaskModel:
    torch.manual_seed(0)
    encoder = load_encoder(f"configs/arch/{arch}", random_init=True)
    return MultitaskModel(encoder, TASKS, pooling="cls").train()


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products: all but the embedding tables."""
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


def plain_step(model: torch.nn.Module, lr: float, device: str):
    """The peer: fp32 weights on the device, autocast to bf16 (on a GPU), fused AdamW, gradients set to None."""
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    autocast = device == "cuda"
    state: dict[str, Any] = {}

    def step(task, batch):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(task, **batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = loss.detach()

    step.state = state
    return step


def experiment(arch: str, micro_batch: int, ds_path: str, args) -> Any:
    return load_config(args.config, [f"encoder.name=configs/arch/{arch}", "encoder.random_init=true",
                                     "encoder.pooling=cls", f"train.micro_batch_size={micro_batch}",
                                     "train.grad_accum=1", f"train.deepspeed_config={ds_path}"])


def measure(step, batches: list, args, tokens: int, params: int, peak: float | None) -> dict[str, Any]:
    seconds = timed(step, batches, args.warmup, args.rounds)
    best = fastest(seconds)
    tokens_per_s = tokens / best
    return {"step_ms": round(1000 * best / args.steps, 2), "tokens_per_s": round(tokens_per_s),
            "mfu": round(6 * params * tokens_per_s / (peak * 1e12), 4) if peak else None,
            "peak_mem_gib": peak_memory_gib(), "seconds_per_round": [round(s, 4) for s in seconds],
            "loss_finite": bool(torch.isfinite(step.state["loss"].float()).item())}


def row(arch: str, micro_batch: int, path: str, zero: int | None, args, peak: float | None) -> dict[str, Any]:
    """One row: a path (`mtp` under ZeRO `zero`, or `plain`) on one model and micro-batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = packed_batches(args.warmup + args.steps, micro_batch, args.seq_len, device)
    tokens = micro_batch * args.seq_len * args.steps
    model = build_model(arch)
    params = matmul_parameters(model)
    reset_memory()
    if path == "plain":
        step = plain_step(model, 1e-4, device)
    else:
        step = engine_step(experiment(arch, micro_batch, args.ds_configs[zero], args), model, [])
    result = {"model": arch, "precision": args.precision, "zero": zero, "path": path, "micro_batch": micro_batch,
              "seq_len": args.seq_len, "parameters": params,
              **guarded(measure, step, batches, args, tokens, params, peak)}
    del step, model
    reset_memory()
    return result


def profile(arch: str, micro_batch: int, args) -> dict[str, Any]:
    """torch.profiler over `args.steps` dense steps of mtp's ZeRO-2 path: operators by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = packed_batches(args.warmup + args.steps, micro_batch, args.seq_len, device)
    step = engine_step(experiment(arch, micro_batch, args.ds_configs[2], args), build_model(arch), [])
    timed(step, batches, args.warmup, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync()
    with torch_profile(activities=activities) as prof:
        seconds = timed(step, batches, 0, 1)[0]
    events = prof.key_averages()
    device_time = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    # kernels alone, as torch's own table sums them: an operator's self device time is its kernels' time again
    busy_us = (sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
               if device == "cuda" else sum(e.self_cpu_time_total for e in events))
    top = sorted(events, key=lambda e: getattr(e, device_time), reverse=True)[:args.top]
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]

    def entry(e) -> dict[str, Any]:
        return {"name": e.key, "calls": e.count, "self_device_ms": round(getattr(e, device_time) / 1000, 3),
                "self_host_ms": round(e.self_cpu_time_total / 1000, 3)}

    step_ms = 1000 * seconds / args.steps
    return {"model": arch, "micro_batch": micro_batch, "seq_len": args.seq_len, "zero": 2, "steps": args.steps,
            "step_ms": round(step_ms, 2), "device_busy_ms_per_step": round(busy_us / 1000 / args.steps, 2),
            "device_busy_fraction": round(busy_us / 1000 / (1000 * seconds), 3),
            "operators_per_step": round(sum(e.count for e in events) / args.steps),
            "by_device_time": [entry(e) for e in top], "by_host_time": [entry(e) for e in host]}


def pruning(arch: str, micro_batch: int, args) -> dict[str, Any]:
    """Each method's step over dense on the same batches (rounds alternate), along the ramp and at the budget."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = packed_batches(args.warmup + args.steps, micro_batch, args.seq_len, device)
    cfg = experiment(arch, micro_batch, args.ds_configs[2], args)
    base = build_model(arch)
    if device == "cuda":
        base = base.cuda()  # the rank factorisation's SVDs on the device
    total = 10 ** 6  # a long schedule: along the ramp the masks move at every step
    paths = {"dense": engine_step(cfg, copy.deepcopy(base), [])}
    for name, settings in PRUNING_PATHS.items():
        for phase in ("ramp", "at_budget"):
            model, hooks = pruned_path(base, settings, args.budget, total, phase)
            paths[f"{name}:{phase}"] = engine_step(cfg, model, hooks, fixed_phase=phase == "at_budget")
    del base
    seconds = alternated(paths, batches, args.warmup, args.rounds)
    dense = fastest(seconds["dense"])
    rows = [{"method": name.split(":")[0], "phase": name.split(":")[1], "step_over_dense": round(fastest(s) / dense, 3),
             "loss_finite": bool(torch.isfinite(paths[name].state["loss"].float()).item())}
            for name, s in seconds.items() if name != "dense"]
    return {"model": arch, "micro_batch": micro_batch, "zero": 2, "budget": args.budget,
            "dense_step_ms": round(1000 * dense / args.steps, 2), "rows": rows}


COMPILED_PATHS = {"dense": None, "structured": {"method": "structured"}, "magnitude": {"method": "magnitude"}}


def compiled(arch: str, micro_batch: int, args) -> dict[str, Any]:
    """Each path's step compiled (the encoder in place, `dynamic=True`, as `train.compile` does) over eager on the
    same batches (rounds alternate), with the first compiled step's seconds: what compiling costs once."""
    import time

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = packed_batches(args.warmup + args.steps, micro_batch, args.seq_len, device)
    cfg = experiment(arch, micro_batch, args.ds_configs[2], args)
    base = build_model(arch)
    if device == "cuda":
        base = base.cuda()
    rows = []
    for name, settings in COMPILED_PATHS.items():
        paths = {}
        first_step_s = None
        for mode in ("eager", "compiled"):
            if settings is None:
                model, hooks = copy.deepcopy(base), []
            else:
                model, hooks = pruned_path(base, settings, args.budget, 10 ** 6, "at_budget")
            step = engine_step(cfg, model, hooks, fixed_phase=settings is not None)
            if mode == "compiled":
                step.engine.module.encoder.compile(dynamic=True)
                sync()
                start = time.perf_counter()
                step(*batches[0])
                sync()
                first_step_s = time.perf_counter() - start
            paths[mode] = step
        seconds = alternated(paths, batches, args.warmup, args.rounds)
        rows.append({"path": name, "eager_step_ms": round(1000 * fastest(seconds["eager"]) / args.steps, 2),
                     "compiled_step_ms": round(1000 * fastest(seconds["compiled"]) / args.steps, 2),
                     "compiled_over_eager": round(fastest(seconds["compiled"]) / fastest(seconds["eager"]), 3),
                     "first_compiled_step_s": round(first_step_s, 1),
                     "loss_finite": all(finite(step) for step in paths.values())})
        del paths
        reset_memory()
    return {"model": arch, "micro_batch": micro_batch, "zero": 2, "budget": args.budget, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    """The rows and the profile as Markdown tables (docs/gpu.md quotes them)."""
    lines = [f"Device: {report['device']}; bf16 dense peak {report['peak_tflops']} TFLOP/s.", "",
             "| model | path | zero | micro-batch | step ms | tokens/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.get("rows", []):
        zero = r["zero"] if r["zero"] is not None else ""
        lines.append(f"| {r['model']} | {r['path']} | {zero} | {r['micro_batch']} | "
                     f"{r.get('step_ms', r.get('error', ''))} | {r.get('tokens_per_s', '')} | {r.get('mfu', '')} | "
                     f"{r.get('peak_mem_gib', '')} |")
    prof = report.get("profile", {})
    if "by_device_time" in prof:
        lines += ["", f"Profile: {prof['model']}, micro-batch {prof['micro_batch']}, ZeRO-2: "
                      f"step {prof['step_ms']} ms, "
                      f"device busy {prof['device_busy_ms_per_step']} ms ({prof['device_busy_fraction']:.0%}), "
                      f"{prof['operators_per_step']} operators per step.", "",
                  "| operator | calls | self device ms | self host ms |", "|---|---|---|---|"]
        lines += [f"| {e['name']} | {e['calls']} | {e['self_device_ms']} | {e['self_host_ms']} |"
                  for e in prof["by_device_time"]]
    if report.get("pruning", {}).get("rows"):
        lines += ["", "| method | phase | step over dense |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['phase']} | {r['step_over_dense']} |" for r in report["pruning"]["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="the trainer settings the engine reads")
    parser.add_argument("--archs", nargs="+", default=["bert-base-uncased", "bert-large-uncased"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=20, help="operators in each profile table")
    parser.add_argument("--sections", nargs="+", default=["rows", "profile", "pruning", "compile"])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny BERT, fp32, short sequences")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_efficiency.json"))
    args = parser.parse_args()
    if args.smoke:
        args.archs, args.micro_batches, args.seq_len, args.steps, args.rounds, args.warmup = (
            ["tiny-bert"], [4], 32, 2, 1, 1)
    args.ds_configs = SMOKE_DS_CONFIGS if args.smoke else DS_CONFIGS
    args.precision = "fp32" if args.smoke else "bf16"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.smoke else "cuda")
    init_distributed()
    peak, device = peak_tflops()
    report: dict[str, Any] = {"benchmark": "gpu_efficiency", "device": device, "peak_tflops": peak,
                              "mfu_rule": "6 x parameters (embedding tables excluded) x tokens/s / peak_tflops",
                              "environment": guarded(environment), "collectives": guarded(collectives),
                              "steps_per_round": args.steps,
                              "rounds": args.rounds, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(markdown(report))

    save()
    largest = args.archs[-1]

    def rows(paths: tuple[tuple[str, int | None], ...]) -> None:
        for arch in args.archs:
            for micro_batch in args.micro_batches:
                for path, zero in paths:
                    result = guarded(row, arch, micro_batch, path, zero, args, peak)
                    if "error" in result:
                        result |= {"model": arch, "path": path, "zero": zero, "micro_batch": micro_batch}
                    report["rows"].append(result)
                    save()
                    print(arch, micro_batch, path, zero, result.get("step_ms", result.get("error")),
                          result.get("mfu"), flush=True)

    # ZeRO-3 engines last: DeepSpeed swaps torch's linear for its own once a stage-3 engine exists in a process
    if "rows" in args.sections:
        rows((("mtp", 2), ("plain", None)))
    if "profile" in args.sections:
        report["profile"] = guarded(profile, largest, args.micro_batches[0], args)
        save()
    if "pruning" in args.sections:
        report["pruning"] = guarded(pruning, largest, args.micro_batches[0], args)
        save()
        print(json.dumps(report["pruning"].get("rows", report["pruning"].get("error")), indent=1), flush=True)
    if "compile" in args.sections:
        report["compile"] = guarded(compiled, largest, args.micro_batches[0], args)
        save()
        print(json.dumps(report["compile"].get("rows", report["compile"].get("error")), indent=1), flush=True)
    if "rows" in args.sections:
        rows((("mtp", 3),))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

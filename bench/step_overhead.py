"""A CPU proxy of the GPU training step: operators and host syncs per optimizer step, mtp's path against a plain loop.

    python bench/step_overhead.py [--models bert-base-uncased bert-large-uncased] [--zero 2 3] [--world 1 2]
                                  [--seq-len 16] [--micro-batch 2] [--steps 2] [--warmup 2]
    python bench/step_overhead.py --smoke --out /tmp/step_overhead.json     # tiny BERT: a check of this script

The same code path as on a GPU (bf16 under DeepSpeed's CPU accelerator), profiled with torch.profiler over
`--steps` optimizer steps after `--warmup` (random weights from configs/arch/, packed random batches of short rows,
the five GLUE heads in turn, so that BERT-large runs in minutes):
- `operators_per_step`: every operator the profiler records (nested ones too), per optimizer step;
- `host_syncs_per_step`: calls that wait for the device on a GPU (`item`, `tolist`, `cpu`, `numpy`, `bool`/`int`/
  `float` of a tensor, `nonzero`, `masked_select`, `unique`), counted by a TorchFunctionMode: on the CPU they do not
  wait, but each is a sync on a GPU;
- `python_ms_per_step`: host time per step outside operators (wall time minus the top-level operators' time).
Rows: mtp's step (`path: mtp`: the trainer's step, bench/pruning_overhead.py's `engine_step`, under bf16 ZeRO-2
and ZeRO-3, at world size 1 and 2) and the plain loop (`path: plain`: fp32 weights, bf16 autocast, fused AdamW),
on BERT-base and BERT-large; `pruning` rows: each method over dense along the ramp (masks move every step) and at
the budget (BERT-large, ZeRO-2, world size 1); `proxy_check`: a bare `deepspeed.initialize` on a 4-layer BERT (hidden
256, batch 4 x 32), with and without `bf16.check_grad_overflow`, against the plain loop, as a new user would measure.
Writes bench/results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine  # noqa: E402
from gpu_efficiency import TASKS, build_model, experiment, packed_batches, plain_step  # noqa: E402
from pruning_overhead import engine_step, pruned_path  # noqa: E402

from mtp.pruning import accelerator_paths  # noqa: E402
from mtp.training.distributed import init_distributed  # noqa: E402

SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "masked_select", "unique"}
PRUNING_PATHS = {"magnitude": {"method": "magnitude"}, "movement": {"method": "movement"},
                 "soft_movement": {"method": "soft_movement"}, "rank": {"method": "rank"},
                 "structured": {"method": "structured"}}
BENCH = Path(__file__).resolve().parent


class SyncCounter(TorchFunctionMode):
    """Counts the calls that wait for the device on a GPU, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


DEVICE = {"name": "cpu"}  # --device: "cuda" runs the same rows on a GPU (bench/gpu_check.sh)


def bf16_config(zero: int, extra: dict[str, Any] | None = None) -> str:
    """The DeepSpeed config of ZeRO stage `zero` with bf16 on, the CPU's or (--device cuda) the GPU recipes' (written
    beside the results, read by mtp)."""
    name = f"gpu_bf16_zero{zero}.json" if DEVICE["name"] == "cuda" else f"cpu_zero{zero}.json"
    ds = json.loads((BENCH.parent / "ds_configs" / name).read_text())
    ds["bf16"] = {"enabled": True} | (extra or {})
    path = BENCH / "results" / ".step_overhead" / f"bf16_zero{zero}{'_' + '_'.join(extra) if extra else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds))
    return str(path)


def profile_steps(step: Any, batches: list, warmup: int, steps: int) -> dict[str, Any]:
    """Operators, host syncs and Python time per optimizer step of `step` over `steps` batches after `warmup`."""
    from torch.profiler import ProfilerActivity, profile

    for task, batch in batches[:warmup]:
        step(task, batch)
    counter = SyncCounter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, counter:
        start = time.perf_counter()
        for task, batch in batches[warmup:warmup + steps]:
            step(task, batch)
        wall = time.perf_counter() - start
    events = prof.events()
    top_level_us = sum(e.cpu_time_total for e in events if e.cpu_parent is None)
    by_name = Counter(e.name for e in events)
    return {"operators_per_step": round(len(events) / steps), "host_syncs_per_step": round(
        sum(counter.calls.values()) / steps, 2), "host_syncs_by_call": {k: v / steps for k, v in counter.calls.items()},
            "python_ms_per_step": round((1e6 * wall - top_level_us) / 1000 / steps, 2),
            "step_ms": round(1000 * wall / steps, 2),
            # where the operators go, by name (nested calls counted), per step; trimmed by `most_frequent` for the file
            "operators_by_name": {name: n / steps for name, n in by_name.most_common()}}


def most_frequent(counts: dict[str, float], n: int = 25) -> dict[str, float]:
    """The `n` largest entries of an operator count by name."""
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def step_row(model_name: str, path: str, zero: int | None, args: argparse.Namespace) -> dict[str, Any]:
    batches = packed_batches(args.warmup + args.steps, args.micro_batch, args.seq_len, DEVICE["name"])
    model = build_model(model_name)
    if path == "plain":
        step = plain_step(model, 1e-4, DEVICE["name"])  # autocast to bf16 on a GPU
        step_autocast = step

        def step(task: str, batch: dict) -> None:  # the plain loop in bf16 autocast, as on a GPU
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DEVICE["name"] == "cpu"):
                step_autocast(task, batch)
    else:
        step = engine_step(experiment(model_name, args.micro_batch, bf16_config(zero), args), model, [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = {"model": model_name, "path": path, "zero": zero, "world_size": world, "precision": "bf16",
           "device": DEVICE["name"],
           "micro_batch": args.micro_batch, "seq_len": args.seq_len, **profile_steps(step, batches, args.warmup,
                                                                                      args.steps)}
    del step, model
    gc.collect()
    return row


def pruning_row(model_name: str, method: str | None, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """Operators and host syncs per step of mtp's step (ZeRO-2) with `method`'s hook (None: dense), on the paths an
    accelerator takes (`accelerator_paths`)."""
    batches = packed_batches(args.warmup + args.steps, args.micro_batch, args.seq_len, DEVICE["name"])
    cfg = experiment(model_name, args.micro_batch, bf16_config(2), args)
    base = build_model(model_name)
    with accelerator_paths():
        if method is None:
            measured = profile_steps(engine_step(cfg, base, []), batches, args.warmup, args.steps)
        else:
            model, hooks = pruned_path(base, PRUNING_PATHS[method], args.budget, 10 ** 6, phase)
            del base  # (pruned_path's copy is what trains: BERT-large's fp32 weights are 1.3 GB)
            measured = profile_steps(engine_step(cfg, model, hooks, fixed_phase=phase == "at_budget"), batches,
                                     args.warmup, args.steps)
    return {"model": model_name, "method": method or "dense", "phase": phase, "zero": 2, **measured}


def in_child(flags: list[str], model_name: str, args: argparse.Namespace, identity: dict[str, Any],
             name: str) -> dict[str, Any]:
    """One row measured by this script in a process of its own (BERT-large's engines do not all fit in memory in
    one process: DeepSpeed keeps them alive), or the row's identity with the error that stopped it."""
    out = BENCH / "results" / ".step_overhead" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags, "--child-out", str(out), "--models", model_name,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--budget", str(args.budget), "--config", args.config, "--device", args.device]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)  # its own process group
    if proc.returncode != 0 or not out.is_file():
        return {**identity, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(out.read_text())


def pruning_rows(model_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each method's operators and host syncs per step over dense, along the ramp and at the budget: one process per
    row (BERT-large's engines do not all fit in memory at once)."""
    def child(method: str, phase: str) -> dict[str, Any]:
        return in_child(["--pruning-child", method, phase], model_name, args,
                        {"model": model_name, "method": method, "phase": phase}, f"pruning_{method}_{phase}")

    dense = child("dense", "dense")
    rows = [dense]
    for name in PRUNING_PATHS:
        for phase in ("ramp", "at_budget"):
            row = child(name, phase)
            if "operators_per_step" in row and "operators_per_step" in dense:
                row["operators_over_dense"] = round(row["operators_per_step"] / dense["operators_per_step"], 3)
                row["dense_operators_per_step"] = dense["operators_per_step"]
                # the method's extra operators by name: where its overhead comes from
                extra = {k: v - dense["operators_by_name"].get(k, 0.0) for k, v in row["operators_by_name"].items()}
                row["extra_operators_by_name"] = most_frequent(extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def memory_by_phase(model_name: str, zero: int, args: argparse.Namespace) -> dict[str, Any]:
    """Device memory (GiB allocated now / peak since the last mark) after the engine is built and after each forward,
    backward and optimizer step of three steps, for mtp's ZeRO `zero` at world size 1; None on a CPU."""
    cuda = DEVICE["name"] == "cuda"

    def mark() -> dict[str, float | None]:
        if not cuda:
            return {"allocated_gib": None, "peak_gib": None}
        torch.cuda.synchronize()
        now = {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 3),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        torch.cuda.reset_peak_memory_stats()
        return now

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    batches = packed_batches(3, args.micro_batch, args.seq_len, DEVICE["name"])
    engine = engine_step(experiment(model_name, args.micro_batch, bf16_config(zero), args), build_model(model_name),
                         []).engine
    phases = [{"phase": "engine_built", **mark()}]
    for i, (task, batch) in enumerate(batches):
        loss = engine(task, **batch)["loss"]
        phases.append({"phase": f"step{i}_forward", **mark()})
        engine.backward(loss)
        phases.append({"phase": f"step{i}_backward", **mark()})
        engine.step()
        phases.append({"phase": f"step{i}_optimizer", **mark()})
    del engine
    gc.collect()
    return {"model": model_name, "zero": zero, "device": DEVICE["name"], "micro_batch": args.micro_batch,
            "seq_len": args.seq_len, "phases": phases,
            "peak_gib": max((p["peak_gib"] for p in phases if p["peak_gib"] is not None), default=None)}


def proxy_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A bare deepspeed.initialize on a 4-layer BERT (hidden 256, batch 4 x 32), as a new user would measure it."""
    import deepspeed
    from transformers import BertConfig, BertForSequenceClassification

    def new_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                        intermediate_size=1024)).train()

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 20000, (4, 32), generator=generator),
                "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(args.warmup + args.steps)]
    rows = []
    model = new_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def plain(_task: str, batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tasks = [("", b) for b in batches]
    rows.append({"path": "plain", **profile_steps(plain, tasks, args.warmup, args.steps)})
    for label, bf16 in (("deepspeed_bf16_zero2", {"enabled": True}),
                        ("deepspeed_bf16_zero2_no_overflow_check", {"enabled": True, "check_grad_overflow": False})):
        ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": bf16,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=new_model(), config=ds)

        def ds_step(_task: str, batch: dict, engine: Any = engine) -> None:
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()

        rows.append({"path": label, **profile_steps(ds_step, tasks, args.warmup, args.steps)})
        del engine
        gc.collect()
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def world_two(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The mtp rows at world size 2: this script again under DeepSpeed's launcher (2 CPU ranks)."""
    out = BENCH / "results" / ".step_overhead" / "world2.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank",
           "--master_port", str(29600 + os.getpid() % 300), str(Path(__file__).resolve()), "--child-out", str(out),
           "--models", *args.models, "--zero", *map(str, args.zero), "--seq-len", str(args.seq_len),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--config", args.config]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    if proc.returncode != 0 or not out.is_file():
        return [{"world_size": 2, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}]
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base-uncased", "bert-large-uncased"])
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, one world size: a check of this script")
    parser.add_argument("--out", default="bench/results/step_overhead.json")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--pruning-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--step-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the same rows on a GPU (its step, not a proxy), and the memory section's figures")
    parser.add_argument("--sections", nargs="+", default=["proxy_check", "steps", "world2", "pruning"],
                        help="what to measure (a run of some sections keeps the others' rows from --out)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.world, args.steps, args.warmup = ["tiny-bert"], [1], 1, 2  # ZeRO-3 settles after 2
    DEVICE["name"] = args.device
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    if args.step_child:  # one step row, in its own process
        path, zero = args.step_child
        Path(args.child_out).write_text(json.dumps(step_row(args.models[0], path, None if zero == "None" else int(zero),
                                                            args)))
        return
    if args.pruning_child:  # one pruning row, in its own process
        method, phase = args.pruning_child
        row = pruning_row(args.models[0], None if method == "dense" else method, phase, args)
        Path(args.child_out).write_text(json.dumps(row))
        return
    if args.child_out:  # one rank of the world-size-2 rows
        rows = [step_row(m, "mtp", z, args) for m in args.models for z in args.zero]
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.child_out).write_text(json.dumps(rows))
        return
    report: dict[str, Any] = {"benchmark": "step_overhead", "rows": []}
    if Path(args.out).is_file():  # rows of the sections not measured this time are kept
        report = json.loads(Path(args.out).read_text())
    report.update({"command": " ".join(["python bench/step_overhead.py", *sys.argv[1:]]), "tasks": list(TASKS),
                   **machine(), "gpu_profile_operators_per_step": 84861})

    def save() -> None:  # after every section: a run stopped part-way keeps what it measured
        for section in ("rows", "pruning", "proxy_check"):
            for row in report.get(section) or []:
                if "operators_by_name" in row:
                    row["operators_by_name"] = most_frequent(row["operators_by_name"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    if "proxy_check" in args.sections:
        report["proxy_check"] = proxy_check(args)
        save()
    if "steps" in args.sections:
        report["rows"] = [r for r in report.get("rows", []) if r.get("world_size", 1) != 1]
        for model_name in args.models:
            for path, zero in [("plain", None), *(("mtp", z) for z in args.zero)]:
                report["rows"].append(in_child(["--step-child", path, str(zero)], model_name, args,
                                               {"model": model_name, "path": path, "zero": zero},
                                               f"step_{model_name}_{path}_{zero}"))
                print(json.dumps(report["rows"][-1]), flush=True)
                save()
    if "world2" in args.sections and 2 in args.world:
        report["rows"] = [r for r in report.get("rows", []) if r.get("world_size", 1) == 1] + world_two(args)
        save()
    if "pruning" in args.sections:
        report["pruning"] = pruning_rows(args.models[-1], args)
        save()
    if "memory" in args.sections:  # ZeRO-2 first: a ZeRO-3 engine swaps torch's linear for DeepSpeed's in the process
        report["memory"] = [memory_by_phase(args.models[-1], zero, args) for zero in sorted(args.zero)]
        save()


if __name__ == "__main__":
    main()

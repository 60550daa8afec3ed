"""Step time of each pruning method over dense training in the same DeepSpeed engine, and of the peer.

    python bench/pruning_overhead.py [--config configs/default.yaml] [--budget 0.25] [--steps 10] [--rounds 4]
                                     [--repeats 3]

Every path is the trainer's step (forward, the hooks' extra loss, backward, DeepSpeed step, the hooks'
optimizer-step event) on the same pre-drawn batches and starting weights, 1 rank, fp32 ZeRO-0 on CPU;
rounds alternate between paths and each path's cost is its quickest round. The whole alternation runs
`--repeats` times in a row on the same engines (element-wise paths go on along their schedule; rank paths
are rewound to their gates at the start); the ratio of each repeat is reported too, so the spread of the
estimate on this machine is in the JSON (`overhead_per_repeat`), beside the headline over all rounds.
Targets: magnitude and movement at most 1.10x dense, rank at most 1.25x (over a run), structured 1.15x.

The peer is DeepSpeed Compression's own `sparse_pruning` with method `topk` at the same density.
`rank` is measured with every gate open (the full-rank factorisation of the start of pruning), at three
points of the cubic ramp, and with the gates beyond the budget closed (`rank_at_budget`, the end of
pruning); `rank_run_mean` is the mean over a whole run with the default schedule, the figure a user pays.
DeepSpeed removed its compression library in 0.19, so the peer runs in a child process on the last
release that has it (deepspeed 0.18.9, installed under bench/.deps/ on first use), against its own
dense baseline in that engine. Writes bench/results/pruning_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import base_model, draw_batches, fastest, machine, time_paths

from mtp.config import load_config
from mtp.pruning import pruning_settings
from mtp.training import zero_step
from mtp.training.distributed import init_distributed
from mtp.training.optim import (
    build_ds_config,
    lr_lambda,
    skip_single_rank_reduction,
    split_param_groups,
    zero3_layers_as_leaves,
)

PEER_DEEPSPEED = "0.18.9"
BENCH = Path(__file__).resolve().parent
RAMP_POINTS = [0.0, 0.1, 0.25, 0.5, 1.0]  # positions on the cubic ramp where rank pruning is timed
PREFIXES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",  # regexes
            "intermediate.dense", r"layer\.\d+\.output\.dense"]


def engine_step(cfg, model, hooks, ds_extra=None, fixed_phase: bool = False):
    """One training step of `model` under DeepSpeed, as the trainer runs it; with `fixed_phase` the hooks enter their
    fixed phase once the engine is built, as a run enters it."""
    import deepspeed

    ds = build_ds_config(cfg, 1) | (ds_extra or {})
    zero_step.install()  # as the trainer does
    zero3_layers_as_leaves(model, ds)  # as the trainer does
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=split_param_groups(model, hooks, cfg.train.weight_decay),
                                      lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(0, 10**6)))
    skip_single_rank_reduction(engine)  # as the trainer does
    if fixed_phase:
        for hook in hooks:
            hook.enter_fixed_phase()
    state = {"step": 0}

    def step(task, batch):
        out = engine(task, **batch)
        loss = out["loss"]
        for hook in hooks:
            loss = hook.batch_loss(task, batch, out, loss)
        for hook in hooks:
            extra = hook.extra_loss(engine.module, state["step"])
            if extra is not None:
                loss = loss + extra
        engine.backward(loss)
        state["loss"] = loss.detach()  # no sync: read after timing
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:  # hooks advance once per optimizer step, as in the trainer
            state["step"] += 1
            for hook in hooks:
                hook.on_optimizer_step(engine.module, state["step"])

    step.state = state
    step.engine = engine
    return step


def rewinder(step, hooks) -> Callable[[], None]:
    """Puts a rank path back where its timing starts (gates, multipliers, step), so that every repeat times
    the same point of pruning: within a repeat the gates drift little, across repeats they would close."""
    modules = [m for hook in hooks for m in hook.modules]
    gates = [m.log_alpha.detach().clone() for m in modules]
    states = [copy.deepcopy(hook.state_dict()) for hook in hooks]

    def rewind() -> None:
        with torch.no_grad():
            for m, saved in zip(modules, gates, strict=True):
                m.log_alpha.copy_(saved)
        for hook, saved in zip(hooks, states, strict=True):
            hook.load_state_dict(copy.deepcopy(saved))
        step.state["step"] = 0

    return rewind


def close_gates_to(hook, fraction: float) -> None:
    """Rank pruning part-way: open gates for the ranks with the largest singular values whose size fits
    `fraction` of the dense encoder blocks (the target the Lagrangian tracks at that point), the rest closed."""
    from dataclasses import replace

    from mtp.pruning import prunable_modules

    modules = [m for _, _, m in prunable_modules(hook.model)]
    budget = hook.budget
    hook.budget = replace(budget, target=int(fraction * budget.dense_blocks))
    with torch.no_grad():
        for m in modules:
            m.log_alpha.copy_((m.P.float().norm(dim=0) * m.Q.float().norm(dim=1)).clamp_min(1e-12).log())
        hook.project()  # which ranks fit, by singular value
        for m in modules:
            m.log_alpha.copy_(torch.where(m.keep, 2.5, -10.0))
            m.keep.fill_(True)
    hook.budget, hook.projected = budget, False


def pruned_path(base, settings: dict, budget: float, total: int, phase: str):
    """A copy of `base` with the hook of `settings` set up, along its ramp (`phase` "ramp": masks move every step)
    or at the budget ("at_budget": rank's gates beyond it closed; build its engine with `fixed_phase=True`, which
    fixes the masks or ranks at the budget as a run does)."""
    from mtp.pruning import build_pruning

    model = copy.deepcopy(base)
    hooks = build_pruning(pruning_settings(**settings, budget=budget, warmup_ratio=0.0, cooldown_ratio=0.0), total)
    for hook in hooks:
        hook.setup(model)
    hook = hooks[0]
    if phase == "at_budget" and settings["method"] == "rank":  # as a run at its budget: gates beyond it closed (the
        close_gates_to(hook, hook.budget.target / hook.budget.dense_blocks)  # projection follows in engine_step)
    return model, hooks


def run_mean(times: dict[float, float], warmup: float, cooldown: float) -> float:
    """Mean step time over a whole run whose schedule is timed at ramp positions 0..1 (trapezoid over the ramp):
    the full-rank start for the dense warmup, the budget for the cool-down."""
    points = sorted(times)
    ramp = sum((b - a) * (times[a] + times[b]) / 2 for a, b in zip(points, points[1:], strict=False))
    return warmup * times[0.0] + (1 - warmup - cooldown) * ramp + cooldown * times[1.0]


def density_of(cfg, base, budget: float) -> float:
    from mtp.model import parameter_counts
    from mtp.pruning import make_budget

    return make_budget(parameter_counts(base), budget).density


def run_peer(args, cfg, batches, base) -> dict:
    """Dense vs DeepSpeed Compression topk sparse pruning, both in this (older) DeepSpeed's engine."""
    import deepspeed
    from deepspeed.compression.compress import init_compression

    density = density_of(cfg, base, args.budget)
    compression = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0, "schedule_offset_end": 10**9, "method": "topk"},
        "different_groups": {"all": {"params": {"dense_ratio": density}, "modules": PREFIXES}}}}}
    dense_model = copy.deepcopy(base)
    peer_model = init_compression(copy.deepcopy(base), compression)
    # what DeepSpeed's compression scheduler does at schedule_offset (its topk path lacks a default for
    # schedule_offset_end in 0.18, so the scheduler is not used): switch pruning on in every compressed layer
    for module in peer_model.modules():
        if getattr(module, "sparse_pruning_method", None) == "topk":
            module.sparse_pruning_enabled = True
    paths = {"dense": engine_step(cfg, dense_model, []),
             "deepspeed_compression_topk": engine_step(cfg, peer_model, [])}
    seconds = time_paths(paths, batches, args.warmup, args.rounds)
    compressed = sum(1 for m in peer_model.modules() if getattr(m, "sparse_pruning_enabled", False))
    return {"deepspeed_version": deepspeed.__version__, "dense_ratio": density, "compressed_layers": compressed,
            "seconds_per_round": seconds,
            "overhead_vs_dense": fastest(seconds["deepspeed_compression_topk"]) / fastest(seconds["dense"])}


def peer_in_child(args) -> dict:
    target = BENCH / ".deps" / f"deepspeed-{PEER_DEEPSPEED}"
    if not (target / "deepspeed" / "compression" / "compress.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"deepspeed=={PEER_DEEPSPEED}"], check=True)
    out = BENCH / "results" / ".peer.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
               TORCH_EXTENSIONS_DIR=str(BENCH / ".deps" / "torch_extensions"))  # its ops must not replace ours
    env.pop("MASTER_PORT", None)  # this process's rendezvous port is taken: the child picks its own
    cmd = [sys.executable, __file__, "--peer-out", str(out), "--config", args.config, "--budget", str(args.budget),
           "--steps", str(args.steps), "--rounds", str(args.rounds * args.repeats), "--repeats", "1",
           "--warmup", str(args.warmup), *args.overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="independent repeats of the alternation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench/results/pruning_overhead.json")
    parser.add_argument("--no-peer", action="store_true", help="skip DeepSpeed Compression")
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    cfg = load_config(args.config, [*args.overrides, "train.deepspeed_config=ds_configs/cpu_zero0.json"])
    batches, tasks = draw_batches(cfg, args.warmup + args.steps)
    base = base_model(cfg, tasks)
    if args.peer_out:
        Path(args.peer_out).write_text(json.dumps(run_peer(args, cfg, batches, base)))
        return

    from mtp.pruning import build_pruning

    total = (args.warmup + args.steps * args.rounds) * args.repeats
    methods = {"magnitude": {}, "movement": {}, "movement_global": {"scope": "global"}, "soft_movement": {},
               "structured": {}, "rank": {}, **{f"rank_ramp_{p}": {} for p in RAMP_POINTS[1:-1]},
               "rank_at_budget": {}}
    defaults = pruning_settings(method="rank", budget=args.budget)
    paths = {"dense": engine_step(cfg, copy.deepcopy(base), [])}
    rewinds = []
    for name, extra in methods.items():
        method = "rank" if name.startswith("rank") else name.replace("_global", "")
        pcfg = pruning_settings(method=method, budget=args.budget, warmup_ratio=0.0, cooldown_ratio=0.0, **extra)
        model = copy.deepcopy(base)
        hooks = build_pruning(pcfg, total)
        for hook in hooks:
            hook.setup(model)
        if name.startswith("rank_"):  # the Lagrangian's target at that point of the cubic ramp
            hook = hooks[0]
            ramp = 1.0 if name == "rank_at_budget" else float(name.rsplit("_", 1)[1])
            end = hook.budget.target / hook.budget.dense_blocks
            close_gates_to(hook, end + (hook.start_density - end) * (1 - ramp) ** 3)
        paths[name] = engine_step(cfg, model, hooks)
        if name.startswith("rank"):
            rewinds.append(rewinder(paths[name], hooks))
    repeats = []
    for _ in range(args.repeats):
        for rewind in rewinds:
            rewind()
        repeats.append(time_paths(paths, batches, args.warmup, args.rounds))
    seconds = {name: [s for rep in repeats for s in rep[name]] for name in paths}

    def overheads(times: dict[str, list[float]]) -> dict[str, float]:
        dense = fastest(times["dense"])
        ratios = {name: fastest(s) / dense for name, s in times.items() if name != "dense"}
        along = {0.0: ratios["rank"], **{p: ratios[f"rank_ramp_{p}"] for p in RAMP_POINTS[1:-1]},
                 1.0: ratios["rank_at_budget"]}
        return ratios | {"rank_run_mean": run_mean(along, defaults.warmup_ratio, defaults.cooldown_ratio)}

    overhead = overheads(seconds)
    per_repeat = [overheads(rep) for rep in repeats]
    report = {"benchmark": "pruning_overhead", "config": args.config, "encoder": cfg.encoder.name,
              "budget": args.budget, "density": density_of(cfg, base, args.budget), "engine": "deepspeed fp32 ZeRO-0",
              "steps_per_round": args.steps, "rounds": args.rounds, "repeats": args.repeats, **machine(),
              "seconds_per_round": seconds, "overhead_vs_dense": overhead,
              "overhead_per_repeat": {name: [rep[name] for rep in per_repeat] for name in overhead},
              "targets": {"magnitude": 1.10, "movement": 1.10, "movement_global": 1.10, "rank_run_mean": 1.25,
                          "structured": 1.15},
              "notes": {"structured": "along the ramp: groups chosen at every step from the Taylor average, "
                                      "its gates on the output maps on",
                        "rank": "all gates open: the full-rank factorisation at the start of pruning (and during "
                                "the dense warmup), 1.5x the dense matrices' FLOPs by construction",
                        "rank_ramp_P": "gates open for the ranks that fit the Lagrangian's target at position P "
                                       "of the cubic ramp (largest singular values first)",
                        "rank_at_budget": "gates beyond the budget closed, as at the end of pruning; closed "
                                          "ranks are skipped in the forward and backward passes",
                        "rank_run_mean": "mean over a run with the default schedule (warmup_ratio "
                                         f"{defaults.warmup_ratio}, cooldown_ratio {defaults.cooldown_ratio}): "
                                         "trapezoid over the timed ramp points"}}
    if not args.no_peer:
        report["peer"] = peer_in_child(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"overhead_vs_dense": overhead, "overhead_per_repeat": report["overhead_per_repeat"],
                      "peer": report.get("peer", {}).get("overhead_vs_dense")}, indent=1))


if __name__ == "__main__":
    main()

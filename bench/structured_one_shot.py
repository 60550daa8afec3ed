"""Which heads and FFN units to keep: structured pruning's criteria tried one-shot on a trained dense encoder (no
retraining), and what its compact form saves in latency.

    python bench/structured_one_shot.py RUN_DIR [--budgets 0.5 0.25 0.1] [--taylor-batches 64]

RUN_DIR is a finished dense run (its `final/`). For every budget B each criterion picks the groups that the
structured method keeps (its greedy fill of B, most important per parameter first) and the model is scored on every
task's dev set as trained:
- `magnitude`: the mean |W| over a group's weights (the method's criterion);
- `taylor`: |sum of g * W| over a head's output-map columns (an FFN unit's output column), summed over batches of
  the training mix (Michel et al. 2019's head importance, Molchanov et al. 2019's first-order estimate), per parameter;
- `random`: random importance (the floor).
The compact model of the magnitude choice is timed against the dense model (eager PyTorch, batch 32 x 128, the
same attention implementation on both sides, at 1 and 2 threads). Writes bench/results/structured_one_shot.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine

from mtp.data import MultitaskSampler, load_tasks, task_probabilities, tokenize_tasks
from mtp.evaluation import collate, evaluate_tasks
from mtp.export import compact_tensors, install_compact
from mtp.model import load_tokenizer
from mtp.pruning import build_pruning, pruning_settings
from mtp.pruning.structured import HEAD_MAPS, StructuredPruning
from mtp.run_folder import build_dense_model, empty_model, read_final
from mtp.zero3 import full_state_dict


def taylor_importance(model: torch.nn.Module, hook: StructuredPruning, batches: list[tuple[str, dict]],
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """|sum g * W| over each group's output-side weights, per batch, summed over batches; divided by group cost."""
    heads = torch.zeros(len(hook.maps), hook.heads)
    units = torch.zeros(len(hook.maps), hook.units)
    model.train()
    for task, batch in batches:
        model.zero_grad()
        model(task, **batch)["loss"].backward()
        with torch.no_grad():
            for i, maps in enumerate(hook.maps):
                out = maps["attn_out"]
                heads[i] += (out.weight.grad * out.weight).sum(0).reshape(hook.heads, hook.head_dim).sum(1).abs()
                ffn = maps["ffn_out"]
                units[i] += (ffn.weight.grad * ffn.weight).sum(0).abs()
    model.zero_grad()
    model.eval()
    return heads / hook.head_cost, units / hook.unit_cost


def latency(model: torch.nn.Module, threads: int, repeats: int = 5) -> float:
    """Median seconds of one forward pass of batch 32 x 128 (after a warm-up)."""
    torch.set_num_threads(threads)
    x = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    times = []
    with torch.no_grad():
        model("rte", input_ids=x, attention_mask=mask)
        for _ in range(repeats):
            start = time.perf_counter()
            model("rte", input_ids=x, attention_mask=mask)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--taylor-batches", type=int, default=64)
    parser.add_argument("--latency-threads", type=int, nargs="*", default=[1, 2], help="none: no timing")
    parser.add_argument("--out", default="bench/results/structured_one_shot.json")
    args = parser.parse_args()

    cfg, meta, state = read_final(Path(args.run_dir))
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    tasks = load_tasks(cfg)
    data = tokenize_tasks(cfg, tasks, tokenizer)
    dense = build_dense_model(cfg, meta, state)
    sizes = {t.name: len(t.train_texts) for t in tasks}
    sampler = MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, 1, seed=0)
    batches = []
    for _ in range(args.taylor_batches):
        task, rows = sampler.next()
        batches.append((task, collate(data[task]["train"], rows, tokenizer)))

    def scores(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate_tasks(model.eval(), tasks, data, tokenizer, cfg.train.eval_batch_size)
        per_task = {name: round(r["score"], 2) for name, r in result.items()}
        return per_task | {"mean": round(statistics.mean(per_task.values()), 2)}

    rows = [{"criterion": "none", "budget": 1.0, "scores": scores(dense)}]
    print(rows[-1], flush=True)
    latencies = []
    dense_latency = {t: latency(dense, t) for t in args.latency_threads}
    for budget in args.budgets:
        for criterion in ("magnitude", "taylor", "random"):
            model = copy.deepcopy(dense)
            # heads and units compete freely, as when this bench chose the criterion (structured_one_shot.json)
            hook = build_pruning(pruning_settings(method="structured", budget=budget, attention_share=None), 100)[0]
            hook.setup(model)
            if criterion == "taylor":
                importance = taylor_importance(model, hook, batches)
                hook.importance = lambda imp=importance: imp
            elif criterion == "random":
                g = torch.Generator().manual_seed(0)
                importance = (torch.rand(len(hook.maps), hook.heads, generator=g),
                              torch.rand(len(hook.maps), hook.units, generator=g))
                hook.importance = lambda imp=importance: imp
            report = hook.final_report(model)
            rows.append({"criterion": criterion, "budget": budget, "kept_fraction": round(report["kept_fraction"], 4),
                         "kept_heads_per_layer": report["kept_heads_per_layer"],
                         "kept_units_per_layer": report["kept_units_per_layer"], "scores": scores(model)})
            print(rows[-1], flush=True)
            if criterion == "magnitude":
                tensors, formats = compact_tensors(hook.cfg, full_state_dict(model), model.model_type)
                compact = install_compact(empty_model(cfg, meta), tensors, formats)
                for threads in args.latency_threads:
                    seconds = latency(compact, threads)
                    latencies.append({"budget": budget, "threads": threads, "batch": 32, "tokens": 128,
                                      "runtime": "pytorch-eager", "seconds": round(seconds, 4),
                                      "dense_seconds": round(dense_latency[threads], 4),
                                      "latency_ratio": round(seconds / dense_latency[threads], 3)})
                    print(latencies[-1], flush=True)
    report = {"benchmark": "structured_one_shot", "run_dir": args.run_dir, "encoder": cfg.encoder.name,
              "tasks": [t.name for t in tasks], "head_maps": list(HEAD_MAPS), "taylor_batches": args.taylor_batches,
              **machine(), "rows": rows, "latency": latencies}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Size on disk and CPU latency of pruned exports against the dense model's, in PyTorch and in onnxruntime.

    python bench/export_size_latency.py --dense RUN_DIR [--runs RUN_DIR ...] [--one-shot magnitude rank structured]
        [--budgets 0.5 0.25 0.1] [--threads 1 2] [--batches 1 32] [--seq 128] [--repeats 10]

Every model goes through `mtp export` (mtp.export.export_run: the compact form and its ONNX file); the dense side is
the export of the dense run `--dense` (the teacher), so both sides take the same export path. `--runs` are finished
pruned runs (what a user would serve); `--one-shot` methods are pruned here in one shot from the dense run's
weights at each of `--budgets` (no training: their latency depends only on the kept structure), for methods
whose trained weights are not at hand; their rows say `"run": "one-shot"`.

Each model is timed in PyTorch eager (the compact model with dense kernels, the same attention implementation as
the dense side; magnitude also with its CSR kernels, runtime `pytorch-sparse`) and in onnxruntime (CPU provider),
at each thread count and batch size, `--seq` tokens: the median of `--repeats` forward passes after a warm-up,
dense and pruned timed alternately. Writes bench/results/export.json: rows with `method`, `budget`, `runtime`,
`threads`, `batch`, `latency_ratio` (pruned over dense seconds), `run`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine  # noqa: E402

from mtp.export import ORT_LEVELS, compact_tensors, export_onnx, export_run, load_compact, onnx_session  # noqa: E402
from mtp.pruning import build_pruning, prunable_modules, pruning_settings  # noqa: E402
from mtp.run_folder import build_dense_model, read_final, read_results  # noqa: E402
from mtp.zero3 import full_state_dict  # noqa: E402


def one_shot(base: torch.nn.Module, method: str, budget: float) -> tuple[torch.nn.Module, Any]:
    """`base` pruned to `budget` without training: magnitude by |W|, rank by singular value, structured by the
    mean |W| of each head and unit (the kept structure is what the latency depends on)."""
    model = copy.deepcopy(base)
    # structured one-shot rows: mean |W| with heads and units competing freely (what the committed rows measured)
    extra = {"criterion": "magnitude", "attention_share": None} if method == "structured" else {}
    settings = pruning_settings(method=method, budget=budget, warmup_ratio=0.0, cooldown_ratio=0.0, **extra)
    hook = build_pruning(settings, 1)[0]
    hook.setup(model)
    if method == "rank":
        with torch.no_grad():  # gate logits ordered like log sigma
            for _, _, m in prunable_modules(model):
                sigma = (m.P.float().norm(dim=0) * m.Q.float().norm(dim=1)).clamp_min(1e-12)
                m.log_alpha.copy_(sigma.log())
        hook.project()
    else:
        hook.on_optimizer_step(model, 1)
    report = hook.kept_report(model)
    assert report["within_budget"], report
    return model.eval(), settings


def save_one_shot(dense_run: Path, model: torch.nn.Module, settings: Any, folder: Path) -> None:
    """The compact export (and its ONNX file) of a one-shot model, as `mtp export` writes a run's."""
    from safetensors.torch import save_file

    cfg, meta, _ = read_final(dense_run)
    cfg = cfg.model_copy(update={"pruning": settings})
    tensors, formats = compact_tensors(settings, full_state_dict(model), model.model_type)
    compact = folder / "compact"
    compact.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(compact / "model.safetensors"))
    meta = {**meta, "config": cfg.model_dump(mode="json")}
    (compact / "compact.json").write_text(json.dumps({"format": "mtp-compact-v1", "formats": formats, "meta": meta}))
    export_onnx(compact, folder / "onnx")


def block_bytes(folder: Path) -> int:
    """Bytes of the encoder blocks' tensors in a compact export (what the budget counts)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "compact" / "model.safetensors"))
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("encoder.encoder."))


class Timed:
    """One exported model in one runtime: `run(batch)` does a forward pass."""

    def __init__(self, folder: Path, runtime: str, threads: int, graph_optimization: str = "all",
                 spinning: bool = True):
        self.runtime = runtime
        if runtime == "onnxruntime":
            self.session = onnx_session(folder / "onnx" / "encoder.onnx", threads, graph_optimization, spinning)
            self.inputs = [i.name for i in self.session.get_inputs()]
        else:
            self.model = load_compact(folder / "compact", sparse_compute=runtime == "pytorch-sparse").eval()
            self.task = next(iter(self.model.heads))

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        if self.runtime == "onnxruntime":
            feeds = {n: (batch[n] if n in batch else torch.zeros_like(batch["input_ids"])).numpy() for n in self.inputs}
            self.session.run(None, feeds)
        else:
            with torch.inference_mode():
                self.model(self.task, **batch)


def ort_operator_ms(folder: Path, level: str, threads: int, batch: dict[str, torch.Tensor], runs: int = 3,
                    ) -> dict[str, float]:
    """Milliseconds per forward pass by onnxruntime operator type (its profiler, after a warm-up pass)."""
    session = onnx_session(folder / "onnx" / "encoder.onnx", threads, level, profile=True)
    feeds = {i.name: (batch[i.name] if i.name in batch else torch.zeros_like(batch["input_ids"])).numpy()
             for i in session.get_inputs()}
    session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    total: dict[str, float] = {}
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for event in kernels[len(kernels) // (runs + 1):]:  # the warm-up pass left out
        op = event["args"]["op_name"]
        total[op] = total.get(op, 0.0) + event["dur"] / 1000 / runs
    return dict(sorted(((k, round(v, 2)) for k, v in total.items()), key=lambda kv: -kv[1]))


def row_identity(row: dict[str, Any]) -> tuple:
    """What a latency row measured: a later call that measures the same replaces it (--keep)."""
    return tuple(row.get(k) for k in ("method", "budget", "run", "runtime", "graph_optimization", "ort_spinning",
                                      "threads", "batch", "tokens"))


def profile_identity(profile: dict[str, Any]) -> tuple:
    """What an operator profile measured (--keep)."""
    return tuple(profile.get(k) for k in ("method", "budget", "run", "graph_optimization", "threads", "batch"))


def paired_latency(dense: Timed, pruned: Timed, batch: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median seconds of each model, timed alternately after two warm-up passes each."""
    for _ in range(2):
        dense.run(batch)
        pruned.run(batch)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for side, model in enumerate((dense, pruned)):
            start = time.perf_counter()
            model.run(batch)
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True, help="the finished dense run (the teacher)")
    parser.add_argument("--runs", nargs="*", default=[], help="finished pruned runs")
    parser.add_argument("--one-shot", nargs="*", default=[], choices=["magnitude", "rank", "structured"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ort-profile", action="store_true",
                        help="also onnxruntime's time per operator type of every model (the largest batch)")
    parser.add_argument("--ort-profile-threads", type=int, default=1, help="threads of the --ort-profile sessions")
    parser.add_argument("--ort-levels", nargs="+", default=["all", "all-no-skipln", "basic"], choices=list(ORT_LEVELS),
                        help="onnxruntime graph optimization levels timed (the same on both sides)")
    parser.add_argument("--ort-spinning", nargs="+", default=["on", "off"], choices=["on", "off"],
                        help="onnxruntime's intra-op threads spinning between operators (its default) or sleeping "
                             "(`session.intra_op.allow_spinning=0`), the same on both sides; rows say `ort_spinning`")
    parser.add_argument("--out", default="bench/results/export.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows (and operator profiles) of --out that this call does not measure again "
                             "(each row is timed in pairs against its own dense side, so rows of several calls "
                             "compare)")
    args = parser.parse_args()

    dense_run = Path(args.dense)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_folder = export_run(dense_run, Path(tmp) / "dense")
        models: list[tuple[str, float, str, Path]] = []
        for run in map(Path, args.runs):
            results = read_results(run)
            pruning = None if results is None else results.pruning
            assert pruning is not None and pruning.method and pruning.budget and pruning.dense_blocks, \
                f"{run}: not a finished pruned run"
            models.append((pruning.method, round(pruning.budget / pruning.dense_blocks, 4), str(run),
                           export_run(run, Path(tmp) / run.name)))
        if args.one_shot:
            cfg, meta, state = read_final(dense_run)
            base = build_dense_model(cfg, meta, state).eval()
            for method in args.one_shot:
                for budget in args.budgets:
                    model, settings = one_shot(base, method, budget)
                    folder = Path(tmp) / f"one-shot-{method}-{budget}"
                    save_one_shot(dense_run, model, settings, folder)
                    models.append((method, budget, "one-shot", folder))
        dense_bytes = block_bytes(dense_folder)
        for method, budget, run, folder in models:
            size = {"compact_block_bytes": block_bytes(folder), "dense_block_bytes": dense_bytes,
                    "block_size_ratio": round(block_bytes(folder) / dense_bytes, 4)}
            ort = [("onnxruntime", level, spin == "on") for level in args.ort_levels for spin in args.ort_spinning]
            runtimes = [("pytorch-eager", None, True), *ort] + (
                [("pytorch-sparse", None, True)] if method == "magnitude" else [])
            for runtime, level, spinning in runtimes:
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    dense_side = Timed(dense_folder, "onnxruntime" if runtime == "onnxruntime" else "pytorch-eager",
                                       threads, level or "all", spinning)
                    pruned = Timed(folder, runtime, threads, level or "all", spinning)
                    for batch_size in args.batches:
                        x = torch.randint(1000, 20000, (batch_size, args.seq),
                                          generator=torch.Generator().manual_seed(0))
                        batch = {"input_ids": x, "attention_mask": torch.ones_like(x)}
                        dense_s, pruned_s = paired_latency(dense_side, pruned, batch, args.repeats)
                        rows.append({"method": method, "budget": budget, "runtime": runtime,
                                     **({"graph_optimization": level, "ort_spinning": spinning} if level else {}),
                                     "threads": threads,
                                     "batch": batch_size, "tokens": args.seq,
                                     "latency_ratio": round(pruned_s / dense_s, 4),
                                     "dense_seconds": round(dense_s, 5), "pruned_seconds": round(pruned_s, 5),
                                     "run": run, **size})
                        print(json.dumps(rows[-1]), flush=True)
        profiles = []
        if args.ort_profile:
            x = torch.randint(1000, 20000, (max(args.batches), args.seq), generator=torch.Generator().manual_seed(0))
            batch = {"input_ids": x, "attention_mask": torch.ones_like(x)}
            for method, budget, run, folder in [("dense", 1.0, str(dense_run), dense_folder), *models]:
                for level in args.ort_levels:
                    profiles.append({"method": method, "budget": budget, "run": run, "graph_optimization": level,
                                     "threads": args.ort_profile_threads, "batch": max(args.batches),
                                     "ms_by_operator": ort_operator_ms(folder, level, args.ort_profile_threads,
                                                                       batch)})
                    print(json.dumps(profiles[-1]), flush=True)
    command = " ".join(["python bench/export_size_latency.py", *sys.argv[1:]])
    earlier: list[str] = []
    if args.keep and Path(args.out).is_file():
        before = json.loads(Path(args.out).read_text())
        old_rows = [{**r, "graph_optimization": r.get("graph_optimization", "all"),
                     "ort_spinning": r.get("ort_spinning", True)} if r["runtime"] == "onnxruntime" else r
                    for r in before["rows"]]  # rows from before these keys were timed at onnxruntime's defaults
        measured = {row_identity(r) for r in rows}
        rows = [r for r in old_rows if row_identity(r) not in measured] + rows
        timed_profiles = {profile_identity(p) for p in profiles}
        profiles = [p for p in before.get("onnxruntime_profiles", []) if profile_identity(p) not in timed_profiles
                    ] + profiles
        earlier = before.get("earlier_commands", []) + [before["command"]]
    import onnxruntime

    report = {"benchmark": "export_size_latency", "onnxruntime": onnxruntime.__version__,
              "dense_run": str(dense_run), "repeats": args.repeats,
              "command": command, **({"earlier_commands": earlier} if earlier else {}), **machine(), "rows": rows,
              **({"onnxruntime_profiles": profiles} if profiles else {}),
              "note": "latency_ratio: the pruned export's median seconds over the dense export's, same runtime, "
                      "threads and batch, timed alternately in one process; block bytes: encoder blocks only"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

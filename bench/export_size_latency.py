"""Size on disk and CPU latency of the compact export against the dense model, at several budgets.

    python bench/export_size_latency.py [--budgets 0.5 0.25 0.1] [--batch 8] [--seq 128] [--repeats 20]

The pruned models are made in one shot from the pretrained encoder (no training): element-wise by
magnitude, rank by keeping the largest singular values over all matrices; size and latency depend
only on the kept structure, not on how it was learnt. Each model goes through the same export code
as `mtp export` (safetensors), is loaded back with `mtp.export.load_compact`, and timed on one batch of
`--batch` x `--seq` tokens (median of `--repeats` forward passes, inference mode, all cores).
Writes bench/results/export.json.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtp.config import ExperimentConfig, load_config  # noqa: E402
from mtp.export import compact_tensors, load_compact  # noqa: E402
from mtp.model import MultitaskModel, load_encoder  # noqa: E402
from mtp.pruning import build_pruning, prunable_modules, pruning_settings  # noqa: E402
from mtp.zero3 import full_state_dict  # noqa: E402


def one_shot(base: MultitaskModel, method: str, budget: float) -> MultitaskModel:
    model = copy.deepcopy(base)
    pcfg = pruning_settings(method=method, budget=budget, warmup_ratio=0.0, cooldown_ratio=0.0)
    hook = build_pruning(pcfg, 1)[0]
    hook.setup(model)
    if method == "magnitude":
        hook.on_optimizer_step(model, 1)
    else:
        with torch.no_grad():  # rank by singular value: gate logits ordered like log sigma
            for _, _, m in prunable_modules(model):
                sigma = (m.P.float().norm(dim=0) * m.Q.float().norm(dim=1)).clamp_min(1e-12)
                m.log_alpha.copy_(sigma.log())
        hook.project()
    report = hook.kept_report(model)
    assert report["within_budget"], report
    return model.eval()


def block_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the encoder blocks' tensors (what the budget counts), apart from embeddings and heads."""
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("encoder.encoder."))


def save_compact(cfg: ExperimentConfig, model: MultitaskModel, folder: Path, meta: dict) -> tuple[int, int]:
    from safetensors.torch import save_file

    tensors, formats = compact_tensors(cfg.pruning, full_state_dict(model), model.model_type)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "compact.json").write_text(json.dumps({"format": "mtp-compact-v1", "formats": formats, "meta": meta}))
    return (folder / "model.safetensors").stat().st_size, block_bytes(tensors)


def latency(model: torch.nn.Module, batch: dict, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model("rte", **batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model("rte", **batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/export.json")
    args = parser.parse_args()

    cfg = load_config(args.config)
    torch.manual_seed(0)
    encoder = load_encoder(cfg.encoder.name, cfg.encoder.random_init, cfg.encoder.config_overrides)
    base = MultitaskModel(encoder, {"rte": 2}, cfg.encoder.pooling).eval()
    meta = {"config": cfg.model_dump(mode="json"),
            "tasks": [{"name": "rte", "labels": ["a", "b"], "metric": "accuracy"}]}
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq)),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        dense_file = Path(tmp) / "dense.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(dense_file))
        dense_bytes = dense_file.stat().st_size
        dense_blocks = block_bytes(base.state_dict())
        dense_s = latency(base, batch, args.repeats)
        for budget in args.budgets:
            for method in ("magnitude", "rank"):
                pruned = one_shot(base, method, budget)
                folder = Path(tmp) / f"{method}-{budget}"
                size, blocks = save_compact(cfg, pruned, folder, meta)
                row = {"budget": budget, "method": method, "compact_bytes": size, "dense_bytes": dense_bytes,
                       "size_ratio": size / dense_bytes, "compact_block_bytes": blocks,
                       "dense_block_bytes": dense_blocks, "block_size_ratio": blocks / dense_blocks,
                       "dense_latency_s": dense_s}
                if method == "magnitude":
                    sparse = load_compact(folder, sparse_compute=True)
                    as_dense = load_compact(folder, sparse_compute=False)
                    row["compact_latency_s"] = latency(sparse, batch, args.repeats)
                    row["compact_dense_kernels_latency_s"] = latency(as_dense, batch, args.repeats)
                    check = as_dense
                else:
                    check = load_compact(folder)
                    row["compact_latency_s"] = latency(check, batch, args.repeats)
                row["latency_ratio"] = row["compact_latency_s"] / dense_s
                with torch.inference_mode():
                    diff = (check("rte", **batch)["logits"] - pruned("rte", **batch)["logits"]).abs().max()
                row["max_logit_diff_vs_pruned_model"] = float(diff)
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    report = {"benchmark": "export_size_latency", "encoder": cfg.encoder.name, "batch": args.batch, "seq": args.seq,
              "threads": torch.get_num_threads(), "rows": rows,
              "note": "sizes include embeddings and heads (unpruned) as well as the encoder blocks"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

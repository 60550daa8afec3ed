"""The model card of an export (its README.md): what the model is, what it keeps, how well and how fast it runs,
and how to make it again. Written by `mtp export`; `mtp export --verify` adds the latency it measures."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mtp.config import ExperimentConfig, dump_config


def latency_against_dense(compact: nn.Module, dense: nn.Module, batch: int = 8, tokens: int = 128,
                          repeats: int = 3) -> dict[str, Any]:
    """Median seconds of one forward pass (every task head) of each model on the same random batch, this process's
    threads, PyTorch eager: the compact export over the dense fold of the same run."""
    task = next(iter(dense.heads))
    x = torch.randint(1000, 2000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}

    def seconds(model: nn.Module) -> float:
        with torch.no_grad():
            model(task, **inputs)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(task, **inputs)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    dense_s, compact_s = seconds(dense.eval()), seconds(compact.eval())
    return {"batch": batch, "tokens": tokens, "threads": torch.get_num_threads(), "runtime": "pytorch-eager",
            "dense_seconds": round(dense_s, 4), "compact_seconds": round(compact_s, 4),
            "latency_ratio": round(compact_s / dense_s, 3)}


def write_model_card(out: Path, cfg: ExperimentConfig, meta: dict[str, Any], latency: dict[str, Any] | None = None,
                     onnx: bool = True) -> Path:
    """out/README.md (and out/config.yaml, the run's config, which the card's command trains again); `onnx`: the
    export has onnx/encoder.onnx (the card shows how to run it)."""
    pruning = meta.get("pruning") or {}
    (out / "config.yaml").write_text(dump_config(cfg))
    lines = ["---", yaml.safe_dump({"library_name": "transformers", "base_model": cfg.encoder.name,
                                    "tags": ["mtp", "pruned", f"pruning-{cfg.pruning.method}"]}).strip(), "---", "",
             f"# {cfg.encoder.name}, pruned by mtp ({cfg.pruning.method})", "",
             f"One encoder for {len(meta['tasks'])} tasks ({', '.join(t['name'] for t in meta['tasks'])}), trained "
             f"together for {meta['steps']} optimizer steps.", "",
             "| | |", "|---|---|", f"| base model | `{cfg.encoder.name}` |", f"| method | `{cfg.pruning.method}` |"]
    if pruning:
        budget, kept = pruning.get("budget_fraction", 0), pruning.get("kept_fraction", 0)
        lines += [f"| budget | {pruning['budget']:,} encoder-block parameters ({budget:.3f} of dense) |",
                  f"| kept | {pruning['kept_blocks']:,} ({kept:.3f} of dense, within budget: "
                  f"{pruning['within_budget']}) |"]
        if "kept_heads_per_layer" in pruning:
            lines += [f"| heads per layer | {pruning['kept_heads_per_layer']} |",
                      f"| FFN units per layer | {pruning['kept_units_per_layer']} |"]
        per_layer = pruning.get("kept_prunable_per_layer", {})
        lines += [f"| kept prunable weights per layer | {', '.join(f'{int(v):,}' for v in per_layer.values())} |"]
    lines += ["", "## Dev scores", "", "| task | score |", "|---|---|"]
    lines += [f"| {name} | {score:.2f} |" for name, score in meta["dev_scores"].items()]
    if latency:
        lines += ["", "## Latency", "",
                  f"The compact form over the dense model of the same run: **{latency['latency_ratio']}** "
                  f"({latency['compact_seconds']} s against {latency['dense_seconds']} s per forward pass, batch "
                  f"{latency['batch']} x {latency['tokens']} tokens, {latency['threads']} threads, "
                  f"{latency['runtime']}; measured by `mtp export --verify`)."]
    lines += ["", "## Loading", "", "```python", "from transformers import AutoModel",
              'encoder = AutoModel.from_pretrained("hf/encoder", trust_remote_code=True)  # code ships in the folder',
              "```", "Task heads: `hf/heads.safetensors` (layout in `hf/heads.json`); with `cls` pooling `hf/<task>/` "
              "is a sequence classifier. `compact/` is mtp's compact form (`mtp.export.load_compact`)"
              + (", `onnx/encoder.onnx` the compact encoder for onnxruntime:" if onnx else
                 " (exported without its ONNX file: `mtp export RUN_DIR` writes `onnx/encoder.onnx` too).")]
    if onnx:
        lines += ["", "```python", "import onnxruntime  # or mtp.export.onnx_session(path, threads, spinning=False)",
                  "",
                  "options = onnxruntime.SessionOptions()",
                  "# where every core runs an intra-op thread, idle threads sleep rather than spin",
                  'options.add_session_config_entry("session.intra_op.allow_spinning", "0")',
                  "# SkipLayerNormFusion left out: its fused fp32 CPU kernel ran slower than the ops it replaces",
                  'session = onnxruntime.InferenceSession("onnx/encoder.onnx", options,',
                  '                                       providers=["CPUExecutionProvider"],',
                  '                                       disabled_optimizers=["SkipLayerNormFusion"])',
                  "```", "The two settings and their measurements: mtp's docs/pruning.md (structured pruning, what it "
                  "buys)."]
    lines += ["",
              "## Made by", "", "```bash", "bash launch.sh --config config.yaml   # the run's config, as trained",
              "mtp export RUN_DIR --verify", "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path

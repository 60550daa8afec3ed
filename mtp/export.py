"""`mtp export RUN_DIR`: the pruned model as (a) a plain Hugging Face checkpoint and (b) a compact form.

(a) `hf/encoder/`: masked weights as zeros and rank factors multiplied back, loadable with
    `transformers.AutoModel` alone; `hf/heads.safetensors` + `hf/heads.json` hold the task heads;
    with `cls` pooling each task also gets `hf/<task>/`, an `AutoModelForSequenceClassification` folder.
(b) `compact/`: element-wise layers stored as a packed bit mask plus their kept values, rank-pruned layers
    as two thin matrices P (d_out x r) and Q (r x d_in) with the gates folded in; everything else dense.
    `load_compact` runs it with CSR sparse and low-rank layers.
Safetensors and JSON only: nothing is loaded through pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mtp.config import ConfigError, ExperimentConfig
from mtp.model import PRUNABLE_BY_ARCH, MultitaskModel, TaskInfo, load_encoder, resolve_encoder_path

COMPACT_FORMAT = "mtp-compact-v1"


# ---------------------------------------------------------------- reading a finished run


def read_final(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Any], dict[str, torch.Tensor]]:
    final = run_dir / "final"
    if not (final / "model.safetensors").is_file():
        raise ConfigError(f"{run_dir}: no final/model.safetensors (has the run finished?)")
    meta = json.loads((final / "mtp.json").read_text())
    return ExperimentConfig.model_validate(meta["config"]), meta, load_file(str(final / "model.safetensors"))


def _prunable_paths(state: dict[str, torch.Tensor], model_type: str) -> list[str]:
    paths = []
    layer_ids = sorted({int(k.split(".")[3]) for k in state if k.startswith("encoder.encoder.layer.")})
    for idx in layer_ids:
        for sub in PRUNABLE_BY_ARCH[model_type].values():
            paths.append(f"encoder.encoder.layer.{idx}.{sub}")
    return paths


def _gate_values(state: dict[str, torch.Tensor], path: str, stretch: tuple[float, float]) -> torch.Tensor:
    """Deterministic gates (as in evaluation) times the final keep mask."""
    low, high = stretch
    s = torch.sigmoid(state[f"{path}.log_alpha"].float())
    return (s * (high - low) + low).clamp(0, 1) * state[f"{path}.keep"].float()


def dense_state(cfg: ExperimentConfig, state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The run's state with every prunable layer as one dense weight (zeros where masked, P diag(g) Q for ranks)."""
    out = {k: v for k, v in state.items() if not k.endswith((".mask", ".scores", ".keep", ".log_alpha", ".P", ".Q"))}
    stretch = (cfg.pruning.gate_low, cfg.pruning.gate_high)
    for path in _prunable_paths(state, model_type):
        if f"{path}.mask" in state:
            out[f"{path}.weight"] = state[f"{path}.weight"] * state[f"{path}.mask"].to(state[f"{path}.weight"].dtype)
        elif f"{path}.P" in state:
            g = _gate_values(state, path, stretch)
            weight = state[f"{path}.P"].float() @ (g[:, None] * state[f"{path}.Q"].float())
            out[f"{path}.weight"] = weight.to(state[f"{path}.P"].dtype)
    return out


def build_dense_model(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> MultitaskModel:
    """The trained multitask model with pruning folded into plain nn.Linear weights."""
    encoder = load_encoder(cfg.encoder.model_copy(update={"random_init": True}))
    tasks = [TaskInfo(t["name"], 1 if t["labels"] is None else len(t["labels"])) for t in meta["tasks"]]
    model = MultitaskModel(encoder, tasks, cfg.encoder.pooling, cfg.encoder.head_dropout)
    model.load_state_dict(dense_state(cfg, state, model.model_type), strict=True)
    return model.eval()


def load_finished_run(run_dir: str | Path, what: str) -> tuple[MultitaskModel, dict[str, Any]]:
    """A finished run's final model (pruning folded into plain weights) and its mtp.json; `what` names the config
    key that asked for it in errors."""
    run_dir = Path(run_dir)
    if not (run_dir / "final" / "model.safetensors").is_file():
        raise ConfigError(f"{what}: {run_dir} holds no finished mtp run (no final/model.safetensors)")
    cfg, meta, state = read_final(run_dir)
    return build_dense_model(cfg, meta, state), meta


def initialise_from_run(model: MultitaskModel, run_dir: str | Path) -> None:
    """Copy a finished run's encoder and the heads of `model`'s tasks into `model` (encoder.init_from)."""
    source, _ = load_finished_run(run_dir, "encoder.init_from")
    missing = [t.name for t in model.tasks if t.name not in source.heads]
    if missing:
        raise ConfigError(f"encoder.init_from: {run_dir} has no head for task {missing[0]!r}")
    state = {k: v for k, v in source.state_dict().items()
             if k.startswith("encoder.") or k.split(".")[1] in model.task_index}
    target = model.state_dict()
    for key, value in state.items():
        if key not in target or target[key].shape != value.shape:
            found = "absent" if key not in target else tuple(target[key].shape)
            raise ConfigError(f"encoder.init_from: {run_dir}: {key} {tuple(value.shape)} does not fit this model "
                              f"({found})")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- (a) Hugging Face


def export_hf(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from mtp.model import load_tokenizer

    model = build_dense_model(cfg, meta, state)
    tokenizer = load_tokenizer(cfg.encoder)
    model.encoder.save_pretrained(out / "encoder")
    tokenizer.save_pretrained(out / "encoder")
    heads = {f"{name}.{k}": v.detach().contiguous() for name, head in model.heads.items()
             for k, v in head.state_dict().items()}
    save_file(heads, str(out / "heads.safetensors"))
    (out / "heads.json").write_text(json.dumps({
        "pooling": cfg.encoder.pooling, "layout": "dropout, dense (1), tanh, dropout, projection (4)",
        "tasks": meta["tasks"]}, indent=2))
    if cfg.encoder.pooling != "cls":
        return
    for task in meta["tasks"]:  # cls pooling + dense/tanh/projection is exactly HF's sequence-classification head
        labels = task["labels"]
        config = model.encoder.config.__class__.from_dict(model.encoder.config.to_dict())
        config.num_labels = 1 if labels is None else len(labels)
        config.problem_type = "regression" if labels is None else "single_label_classification"
        if labels:
            config.id2label = dict(enumerate(labels))
            config.label2id = {v: i for i, v in enumerate(labels)}
        hf = AutoModelForSequenceClassification.from_config(config)
        base = getattr(hf, hf.base_model_prefix)
        base.load_state_dict(model.encoder.state_dict(), strict=False)
        head = model.heads[task["name"]]
        if config.model_type == "bert":
            hf.bert.pooler.dense.load_state_dict(head[1].state_dict())
            hf.classifier.load_state_dict(head[4].state_dict())
        else:
            hf.classifier.dense.load_state_dict(head[1].state_dict())
            hf.classifier.out_proj.load_state_dict(head[4].state_dict())
        hf.save_pretrained(out / task["name"])
        tokenizer.save_pretrained(out / task["name"])


# ---------------------------------------------------------------- (b) compact


class SparseLinear(nn.Module):
    """y = x W^T + b with W held as a CSR sparse matrix."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_csr", weight.to_sparse_csr())
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = (self.weight_csr @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class LowRankLinear(nn.Module):
    """y = P (Q x) + b with P (d_out x r), Q (r x d_in)."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.P, self.Q = nn.Parameter(p), nn.Parameter(q)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Q), self.P, self.bias)


def compact_tensors(cfg: ExperimentConfig, state: dict[str, torch.Tensor], model_type: str,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The compact tensors and each prunable layer's storage format ("bitmask", "lowrank" or "dense")."""
    dense = dense_state(cfg, state, model_type)
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    stretch = (cfg.pruning.gate_low, cfg.pruning.gate_high)
    paths = _prunable_paths(state, model_type)
    for path in paths:
        if f"{path}.mask" in state:
            mask = state[f"{path}.mask"].bool()
            bits = np.packbits(mask.numpy().reshape(-1))
            tensors[f"{path}.bitmask"] = torch.from_numpy(bits)
            tensors[f"{path}.values"] = state[f"{path}.weight"][mask].contiguous()
            tensors[f"{path}.shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
            formats[path] = "bitmask"
        elif f"{path}.P" in state:
            g = _gate_values(state, path, stretch)
            kept = g > 0
            tensors[f"{path}.P"] = (state[f"{path}.P"].float()[:, kept] * g[kept]).to(state[f"{path}.P"].dtype)
            tensors[f"{path}.Q"] = state[f"{path}.Q"][kept].contiguous()
            formats[path] = "lowrank"
        else:
            formats[path] = "dense"
    prunable_weights = {f"{p}.weight" for p in paths if formats[p] != "dense"}
    for key, value in dense.items():
        if key not in prunable_weights:
            tensors[key] = value.contiguous()
    return tensors, formats


def export_compact(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(resolve_encoder_path(cfg.encoder.name)).model_type
    tensors, formats = compact_tensors(cfg, state, model_type)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "compact.json").write_text(json.dumps({"format": COMPACT_FORMAT, "formats": formats, "meta": meta},
                                                 indent=2))


def load_compact(folder: str | Path, sparse_compute: bool = True) -> MultitaskModel:
    """Rebuild the multitask model from `compact/`, ready for inference.

    Rank-pruned layers run as two thin matrices. Element-wise layers run as CSR sparse matrices, or, with
    `sparse_compute=False`, as dense matrices with zeros (faster on CPU unless the density is low).
    """
    folder = Path(folder)
    info = json.loads((folder / "compact.json").read_text())
    if info.get("format") != COMPACT_FORMAT:
        raise ConfigError(f"{folder}/compact.json: not an {COMPACT_FORMAT} export")
    meta = info["meta"]
    cfg = ExperimentConfig.model_validate(meta["config"])
    tensors = load_file(str(folder / "model.safetensors"))
    # built on CPU, not on the meta device: HF encoders hold non-persistent buffers (position ids) that
    # a meta build would leave uninitialised
    encoder = load_encoder(cfg.encoder.model_copy(update={"random_init": True}))
    tasks = [TaskInfo(t["name"], 1 if t["labels"] is None else len(t["labels"])) for t in meta["tasks"]]
    model = MultitaskModel(encoder, tasks, cfg.encoder.pooling, cfg.encoder.head_dropout)
    for path, fmt in info["formats"].items():
        if fmt == "dense":
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        bias = tensors.pop(f"{path}.bias", None)
        if fmt == "bitmask":
            shape = tuple(tensors.pop(f"{path}.shape").tolist())
            bits = np.unpackbits(tensors.pop(f"{path}.bitmask").numpy(), count=int(np.prod(shape)))
            mask = torch.from_numpy(bits.astype(bool)).reshape(shape)
            values = tensors.pop(f"{path}.values")
            weight = torch.zeros(shape, dtype=values.dtype)
            weight[mask] = values
            if sparse_compute:
                setattr(parent, child, SparseLinear(weight, bias))
            else:
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
                linear.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
                setattr(parent, child, linear)
        else:
            setattr(parent, child, LowRankLinear(tensors.pop(f"{path}.P"), tensors.pop(f"{path}.Q"), bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    replaced = {p for p, f in info["formats"].items() if f != "dense"}
    leftovers = [k for k in missing if k.rpartition(".")[0] not in replaced]
    if leftovers or unexpected:
        raise ConfigError(f"{folder}: compact export does not match its model ({(leftovers + unexpected)[:3]})")
    return model.eval()


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `hf/` and `compact/` for a finished run; returns the export folder."""
    run_dir = Path(run_dir)
    cfg, meta, state = read_final(run_dir)
    out = Path(out) if out else run_dir / "export"
    if out.exists():
        shutil.rmtree(out)
    export_hf(cfg, meta, state, out / "hf")
    export_compact(cfg, meta, state, out / "compact")
    return out


def verify_export(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Score the compact model (and the HF encoder's outputs) against the trained model, on the dev sets."""
    from transformers import AutoModel

    from mtp.config import cache_dir
    from mtp.data import load_tasks, tokenize_task
    from mtp.model import load_tokenizer
    from mtp.train import collate, evaluate_tasks

    run_dir, out = Path(run_dir), Path(out)
    cfg, meta, state = read_final(run_dir)
    trained = build_dense_model(cfg, meta, state)
    compact = load_compact(out / "compact")
    tokenizer = load_tokenizer(cfg.encoder)
    tasks = load_tasks(cfg)
    tok_id = f"{cfg.encoder.tokenizer or cfg.encoder.name}:{type(tokenizer).__name__}"
    data = {t.name: tokenize_task(t, tokenizer, cfg.data.max_seq_len, cache_dir(cfg) / "tokenized", tok_id)
            for t in tasks}
    scores = evaluate_tasks(compact, tasks, data, tokenizer, cfg.train.eval_batch_size)
    compact_scores = {k: v["score"] for k, v in scores.items()}
    hf_encoder = AutoModel.from_pretrained(out / "hf" / "encoder").eval()
    max_logit_diff = 0.0
    max_hidden_diff = 0.0
    with torch.no_grad():
        for task in tasks:
            split = data[task.name][f"dev_{next(iter(task.dev))}"]
            batch = collate(split, list(range(min(32, len(split)))), tokenizer)
            batch.pop("labels")
            a = trained(task.name, **batch)["logits"]
            b = compact(task.name, **batch)["logits"]
            max_logit_diff = max(max_logit_diff, float((a - b).abs().max()))
            kwargs = {k: v for k, v in batch.items() if k != "token_type_ids" or
                      getattr(hf_encoder.config, "type_vocab_size", 1) > 1}
            h1 = hf_encoder(**kwargs).last_hidden_state
            h2 = trained.encoder(**kwargs).last_hidden_state
            max_hidden_diff = max(max_hidden_diff, float((h1 - h2).abs().max()))
    score_diff = max(abs(compact_scores[k] - meta["dev_scores"][k]) for k in compact_scores)
    return {"dev_scores_at_end_of_training": meta["dev_scores"], "dev_scores_compact": compact_scores,
            "max_score_diff": score_diff, "max_logit_diff_compact": max_logit_diff,
            "max_hidden_diff_hf_encoder": max_hidden_diff,
            "ok": score_diff <= 1e-4 * 100 and max_logit_diff <= 1e-4 and max_hidden_diff <= 1e-4}

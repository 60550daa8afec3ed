"""`mtp export RUN_DIR`: the pruned model as (a) a Hugging Face checkpoint, (b) a compact form and (c) ONNX.

(a) `hf/encoder/`: masked weights as zeros and rank factors multiplied back, loadable with
    `transformers.AutoModel` alone (`from_pretrained(path, add_pooling_layer=False)`: the encoder has no pooler,
    the task heads pool); a structured run's encoder at its kept per-layer shapes, with its modeling code in the
    folder (`trust_remote_code=True`); `hf/heads.safetensors` + `hf/heads.json` hold the task heads;
    with `cls` pooling each task also gets `hf/<task>/`, an `AutoModelForSequenceClassification` folder.
(b) `compact/`: each prunable layer in its method layer's compact form (element-wise: a packed bit mask plus the
    kept values; rank: two thin matrices P (d_out x r) and Q (r x d_in) with the gates folded in); everything else
    dense. `load_compact` runs it with the layers' inference modules (CSR sparse, low-rank).
(c) `onnx/encoder.onnx`: the compact encoder through torch.onnx, run by onnxruntime (hidden states out).
Safetensors and JSON only: nothing is loaded through pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtp.config import ConfigError, ExperimentConfig, saved_config
from mtp.data import load_tasks, tokenize_tasks
from mtp.evaluation import collate, evaluate_tasks
from mtp.model import MultitaskModel, encoder_layers, load_hf_config, load_tokenizer
from mtp.model_card import latency_against_dense, write_model_card
from mtp.pruned_encoder import PRUNED_CLASSES, kept_shapes
from mtp.pruning import PruningSettings, compact_layers, get_method
from mtp.run_folder import build_dense_model, dense_state, empty_model, prunable_paths, read_final

COMPACT_FORMAT = "mtp-compact-v1"


# ---------------------------------------------------------------- (a) Hugging Face


def pruned_hf_encoder(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The encoder at its kept per-layer shapes, as a transformers model whose code (mtp/pruned_encoder.py) is saved
    beside its weights: what a structured run exports as `hf/encoder`."""
    tensors, formats = compact_tensors(cfg.pruning, state, load_hf_config(cfg.encoder.name).model_type)
    compact = install_compact(empty_model(cfg, meta), tensors, formats).encoder
    heads, units = kept_shapes(compact)
    config_class, model_class, classifier_class = PRUNED_CLASSES[compact.config.model_type]
    dense = {k: v for k, v in compact.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = config_class(heads_per_layer=heads, intermediate_per_layer=units, **dense)
    encoder = model_class(config)
    encoder.load_state_dict(compact.state_dict(), strict=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    classifier_class.register_for_auto_class("AutoModelForSequenceClassification")
    return encoder.eval()


def export_hf(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = build_dense_model(cfg, meta, state)
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    layer = get_method(cfg.pruning.method).layer
    encoder = pruned_hf_encoder(cfg, meta, state) if layer is not None and layer.shrinks_blocks else model.encoder
    encoder.save_pretrained(out / "encoder")
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
        config = encoder.config.__class__.from_dict(encoder.config.to_dict())
        config.num_labels = 1 if labels is None else len(labels)
        config.problem_type = "regression" if labels is None else "single_label_classification"
        if labels:
            config.id2label = dict(enumerate(labels))
            config.label2id = {v: i for i, v in enumerate(labels)}
        if encoder is model.encoder:
            hf = AutoModelForSequenceClassification.from_config(config)
        else:
            hf = PRUNED_CLASSES[model.model_type][2](config)
        base = getattr(hf, hf.base_model_prefix)
        base.load_state_dict(encoder.state_dict(), strict=False)
        head = model.heads[task["name"]]
        if model.model_type == "bert":
            hf.bert.pooler.dense.load_state_dict(head[1].state_dict())
            hf.classifier.load_state_dict(head[4].state_dict())
        else:
            hf.classifier.dense.load_state_dict(head[1].state_dict())
            hf.classifier.out_proj.load_state_dict(head[4].state_dict())
        hf.save_pretrained(out / task["name"])
        tokenizer.save_pretrained(out / task["name"])


# ---------------------------------------------------------------- (b) compact


def compact_tensors(pruning: PruningSettings, state: dict[str, torch.Tensor], model_type: str,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The compact tensors and each prunable layer's storage format (its layer's `compact_format`, or "dense")."""
    dense = dense_state(pruning, state, model_type)
    layer = get_method(pruning.method).layer
    paths = prunable_paths(state, model_type)
    tensors: dict[str, torch.Tensor] = {}
    formats = {path: "dense" if layer is None else layer.compact_format for path in paths}
    if layer is not None:
        for path in paths:
            tensors.update(layer.compact(state, path, pruning))
    prunable_weights = {f"{p}.weight" for p in paths if formats[p] != "dense"}
    for key, value in dense.items():
        if key not in prunable_weights:
            tensors[key] = value.contiguous()
    return tensors, formats


def export_compact(cfg: ExperimentConfig, meta: dict[str, Any], state: dict[str, torch.Tensor], out: Path) -> None:
    model_type = load_hf_config(cfg.encoder.name).model_type
    tensors, formats = compact_tensors(cfg.pruning, state, model_type)
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
    cfg = saved_config(meta["config"])
    tensors = load_file(str(folder / "model.safetensors"))
    return install_compact(empty_model(cfg, meta), tensors, info["formats"], sparse_compute, f"{folder}/compact.json")


def install_compact(model: MultitaskModel, tensors: dict[str, torch.Tensor], formats: dict[str, str],
                    sparse_compute: bool = True, source: str = "compact") -> MultitaskModel:
    """Swap each prunable layer of `model` for the inference module of its compact form and load the rest.

    The tensors take `model`'s dtype: a run trained in bf16 or fp16 saves (and exports) its weights in that
    precision, and the compact modules must compute in the dtype of the layers around them (float32 on CPU)."""
    dtype = next(model.parameters()).dtype
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    layers = compact_layers()
    for path, fmt in formats.items():
        if fmt == "dense":
            continue
        if fmt not in layers:
            raise ConfigError(f"{source}: {path}: unknown format {fmt!r} (known: {', '.join(layers)})")
        parent_path, _, child = path.rpartition(".")
        bias = tensors.pop(f"{path}.bias", None)
        setattr(model.get_submodule(parent_path), child, layers[fmt].from_compact(tensors, path, bias, sparse_compute))
    for fmt in sorted({f for f in formats.values() if f != "dense"}):
        for block in encoder_layers(model):
            layers[fmt].compact_block(block, model.model_type)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    replaced = {p for p, f in formats.items() if f != "dense"}
    leftovers = [k for k in missing if k.rpartition(".")[0] not in replaced]
    if leftovers or unexpected:
        raise ConfigError(f"{source}: compact export does not match its model ({(leftovers + unexpected)[:3]})")
    return model.eval()


# ---------------------------------------------------------------- (c) ONNX


class EncoderGraph(nn.Module):
    """The encoder as ONNX sees it: token ids and attention mask (and segment ids where the encoder has them) in,
    every token's last hidden state out (the task heads pool and project it: hf/heads.safetensors)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.segments = getattr(encoder.config, "type_vocab_size", 1) > 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.segments else {}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(["token_type_ids"] if self.segments else [])]


def export_onnx(compact_folder: Path, out: Path) -> Path:
    """The compact encoder (dense kernels: ONNX has no CSR layers) as `encoder.onnx`, batch and length dynamic,
    through torch.onnx's exporter; onnxruntime runs it."""
    graph = EncoderGraph(load_compact(compact_folder, sparse_compute=False).encoder).eval()
    names = graph.input_names()
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "encoder.onnx"
    torch.onnx.export(graph, example, str(path), input_names=names, output_names=["last_hidden_state"],
                      dynamic_shapes={name: dims for name in names}, dynamo=True, verbose=False)
    return path


# onnxruntime's graph optimization levels, each with the graph transformers it leaves out. "all" is onnxruntime's
# default; "all-no-skipln" is "all" without SkipLayerNormFusion, whose fused fp32 CPU kernel (onnxruntime 1.32) ran
# several times slower than the Add, Add and LayerNormalization it replaces; "basic" leaves out every fused contrib
# kernel (docs/pruning.md has the measurements that chose the serving level).
ORT_LEVELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "all": ("ORT_ENABLE_ALL", ()),
    "all-no-skipln": ("ORT_ENABLE_ALL", ("SkipLayerNormFusion",)),
    "extended": ("ORT_ENABLE_EXTENDED", ()),
    "basic": ("ORT_ENABLE_BASIC", ()),
}
SERVING_LEVEL = "all-no-skipln"


def onnx_session(path: str | Path, threads: int | None = None, level: str = SERVING_LEVEL, spinning: bool = True,
                 profile: bool = False) -> Any:
    """An onnxruntime CPU session of an exported `encoder.onnx` at graph optimization `level` (ORT_LEVELS; the
    default is the level mtp serves its exports with), `threads` intra-op threads (None: onnxruntime's choice).
    `spinning=False` sets `session.intra_op.allow_spinning` to 0: idle intra-op threads sleep instead of spinning
    between operators (onnxruntime's default spins; on a 2-core machine with both cores in use, sleeping ran the
    exports faster: docs/pruning.md has the measurement, not its cause)."""
    import onnxruntime

    if level not in ORT_LEVELS:
        raise ConfigError(f"onnxruntime level {level!r}: one of {', '.join(ORT_LEVELS)}")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    enum_name, disabled = ORT_LEVELS[level]
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, enum_name)
    options.enable_profiling = profile
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled))


def onnx_hidden_states(path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`encoder.onnx` run by onnxruntime (the serving session, `onnx_session`) on a batch (the inputs it declares,
    taken from `batch`)."""
    session = onnx_session(path)
    feeds = {i.name: batch[i.name].numpy() if i.name in batch else torch.zeros_like(batch["input_ids"]).numpy()
             for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0])


def export_run(run_dir: str | Path, out: str | Path | None = None, onnx: bool = True) -> Path:
    """Write `hf/`, `compact/` and (with `onnx`) `onnx/` for a finished run; returns the export folder."""
    run_dir = Path(run_dir)
    cfg, meta, state = read_final(run_dir)
    out = Path(out) if out else run_dir / "export"
    if out.exists():
        shutil.rmtree(out)
    export_hf(cfg, meta, state, out / "hf")
    export_compact(cfg, meta, state, out / "compact")
    if onnx:
        export_onnx(out / "compact", out / "onnx")
    write_model_card(out, cfg, meta, onnx=onnx)
    return out


def verify_export(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Score the compact model (and the HF encoder's outputs) against the trained model, on the dev sets.

    A run trained in fp32 is checked against the dev scores it reached at the end of training. A run trained in
    bf16 or fp16 (its saved weights are) was scored then in that precision, which float32 does not reproduce
    exactly: the compact model is checked against the trained weights scored here in float32, and the gap to
    the end of training is reported beside it."""
    from transformers import AutoModel

    run_dir, out = Path(run_dir), Path(out)
    cfg, meta, state = read_final(run_dir)
    trained = build_dense_model(cfg, meta, state)
    compact = load_compact(out / "compact")
    tokenizer = load_tokenizer(cfg.encoder.tokenizer_name)
    tasks = load_tasks(cfg)
    data = tokenize_tasks(cfg, tasks, tokenizer)
    scores = evaluate_tasks(compact, tasks, data, tokenizer, cfg.train.eval_batch_size)
    compact_scores = {k: v["score"] for k, v in scores.items()}
    low_precision = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()
                            if v.is_floating_point() and v.dtype != torch.float32})
    reference = meta["dev_scores"]
    if low_precision:
        trained_scores = evaluate_tasks(trained, tasks, data, tokenizer, cfg.train.eval_batch_size)
        reference = {k: v["score"] for k, v in trained_scores.items()}
    # a structured export ships its modeling code (mtp/pruned_encoder.py) in the folder
    hf_encoder = AutoModel.from_pretrained(out / "hf" / "encoder", add_pooling_layer=False,
                                           trust_remote_code=True).eval()
    max_logit_diff = 0.0
    max_hidden_diff = 0.0
    onnx_path = out / "onnx" / "encoder.onnx"
    max_onnx_diff = 0.0 if onnx_path.is_file() else None
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
            if max_onnx_diff is not None:
                h3 = onnx_hidden_states(onnx_path, batch)
                h4 = compact.encoder(**kwargs).last_hidden_state
                max_onnx_diff = max(max_onnx_diff, float((h3 - h4).abs().max()))
    score_diff = max(abs(compact_scores[k] - reference[k]) for k in compact_scores)
    report = {"dev_scores_at_end_of_training": meta["dev_scores"], "dev_scores_compact": compact_scores,
              "max_score_diff": score_diff, "max_logit_diff_compact": max_logit_diff,
              "max_hidden_diff_hf_encoder": max_hidden_diff, "max_hidden_diff_onnx": max_onnx_diff,
              "ok": score_diff <= 1e-4 * 100 and max_logit_diff <= 1e-4 and max_hidden_diff <= 1e-4
              and (max_onnx_diff is None or max_onnx_diff <= 1e-4)}
    if low_precision:
        report |= {"trained_in": low_precision, "dev_scores_trained_fp32": reference,
                   "max_gap_to_end_of_training": max(abs(reference[k] - meta["dev_scores"][k]) for k in reference)}
    report["latency"] = latency_against_dense(compact, trained)
    write_model_card(out, cfg, meta, report["latency"], onnx=(out / "onnx" / "encoder.onnx").is_file())
    return report

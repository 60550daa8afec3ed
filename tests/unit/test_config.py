"""Config schema and overrides: one line naming the key for every mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtp.config import ConfigError, load_config, saved_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def test_overrides_reach_nested_keys_and_tasks_by_name() -> None:
    cfg = load_config(TINY, ["train.lr=3e-4", "tasks.stsb.weight=2.5", "sampling.strategy=uniform",
                             "encoder.config_overrides.num_hidden_layers=1"])
    assert cfg.train.lr == 3e-4
    assert [t.weight for t in cfg.tasks] == [1.0, 2.5]
    assert cfg.sampling.strategy == "uniform"
    assert cfg.encoder.config_overrides == {"num_hidden_layers": 1}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than 0"),
        ("sampling.strategy=random", "sampling.strategy: Input should be"),
        ("tasks.nope.weight=1", "override tasks.nope.weight: no list item 'nope'"),
    ],
)
def test_schema_errors_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(TINY, [override])


def test_given_probabilities_must_match_tasks() -> None:
    with pytest.raises(ConfigError, match="sampling.probabilities: 'stsb' must match"):
        load_config(TINY, ["sampling.strategy=given", "sampling.probabilities={rte: 1.0}"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["pruning.method=magnitude", "pruning.budget=0.5", "pruning.score_lr=0.1"],
         "pruning.score_lr: not a key of method 'magnitude' (a key of movement, soft_movement)"),
        (["pruning.method=rank", "pruning.budget=0.5", "pruning.scope=global"],
         "pruning.scope: not a key of method 'rank' (a key of magnitude, movement)"),
        (["pruning.method=pruned"], "pruning.method: unknown method 'pruned' (one of none, magnitude"),
        (["pruning.method=rank", "pruning.budget=0.5", "pruning.gate_lr=0"],
         "pruning.gate_lr: Input should be greater"),
        (["pruning.budget=0.5", "pruning.gate_lr=0.1"], "pruning.gate_lr: not a key of method 'none' (a key of rank)"),
    ],
)
def test_each_method_reads_its_own_pruning_keys(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == f"{TINY}: {expected}" or expected in str(err.value)


def test_a_run_saved_with_every_methods_keys_still_loads() -> None:
    """Runs saved before each method had its own keys hold all of them in `pruning:`."""
    cfg = load_config(TINY, ["pruning.method=rank", "pruning.budget=0.5"])
    tree = cfg.model_dump(mode="json")
    tree["pruning"] |= {"scope": "per_matrix", "score_lr": 0.01, "soft_threshold": 0.1}
    assert saved_config(tree) == cfg


def test_a_run_saved_before_a_key_existed_reads_with_the_behaviour_it_trained_with() -> None:
    """A structured run saved before `attention_share` competed freely: its saved config reads as null, not as
    today's default, and so keeps its recipe; a run saved with the key keeps the value it saved."""
    from mtp.compare.plan import recipe_hash

    cfg = load_config(TINY, ["pruning.method=structured", "pruning.budget=0.5"])
    assert cfg.pruning.attention_share == 0.3333
    old = cfg.model_dump(mode="json")
    del old["pruning"]["attention_share"]
    loaded = saved_config(old)
    assert loaded.pruning.attention_share is None
    before = load_config(TINY, ["pruning.method=structured", "pruning.budget=0.5", "pruning.attention_share=null"])
    assert recipe_hash(loaded) == recipe_hash(before) != recipe_hash(cfg)
    assert saved_config(cfg.model_dump(mode="json")) == cfg
    magnitude = load_config(TINY, ["pruning.method=magnitude", "pruning.budget=0.5"])
    assert saved_config(magnitude.model_dump(mode="json")) == magnitude


def test_the_command_line_starts_without_the_heavy_libraries() -> None:
    """Every `mtp` command (and each of its one-line errors) imports the CLI, the config and the method registry:
    none of them may pull in transformers, DeepSpeed, datasets, ONNX or Ray (seconds at every start; the structured
    method's export classes once did)."""
    code = ("import sys, mtp.cli; heavy = ('transformers', 'deepspeed', 'datasets', 'onnx', 'onnxruntime', 'ray'); "
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""

"""The shared pruning machinery against references: the cubic schedule, the first step at the budget, budget arithmetic,
the architecture map of the prunable maps."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from mtp.config import ConfigError
from mtp.model import MultitaskModel, load_encoder, parameter_counts
from mtp.pruning import (
    MaskedLinear,
    build_pruning,
    cubic_schedule,
    make_budget,
    prunable_modules,
    pruning_settings,
)


def test_cubic_schedule_break_points() -> None:
    kw = {"total": 100, "warmup": 10, "cooldown": 20, "start": 1.0, "end": 0.1}
    assert cubic_schedule(0, **kw) == 1.0 and cubic_schedule(10, **kw) == 1.0
    assert cubic_schedule(81, **kw) == 0.1 and cubic_schedule(100, **kw) == 0.1
    # halfway through the ramp (step 45 of 10..80): v_f + (v0 - v_f) * (1 - 0.5)^3
    assert cubic_schedule(45, **kw) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cubic_schedule(80, **kw) == pytest.approx(0.1)


def test_first_step_at_budget_by_hand() -> None:
    from mtp.pruning.base import first_step_at_budget

    # 100 steps, the last 25 at fixed masks: the schedule spans 75 steps, dense to step 10, ramp over 10..70
    # (75 - 10 - 5 steps), at the budget for its last 5: the target first equals the budget at step 70
    settings = pruning_settings(method="magnitude", budget=0.5, warmup_ratio=0.1, cooldown_ratio=0.05,
                                finetune_ratio=0.25)
    assert first_step_at_budget(settings, 100) == 70
    no_phases = pruning_settings(method="movement", budget=0.5, warmup_ratio=0.0, cooldown_ratio=0.0)
    assert first_step_at_budget(no_phases, 10) == 10  # the ramp ends with the run
    assert first_step_at_budget(pruning_settings(method="none"), 100) == 0


def test_budget_arithmetic_for_bert_base_by_hand() -> None:
    with torch.device("meta"):
        model = MultitaskModel(load_encoder("configs/arch/bert-base-uncased", random_init=True),
                               {"rte": 2})
    counts = parameter_counts(model)
    # per block: Q, K, V, attention output 768x768; FFN 3072x768 and 768x3072
    prunable = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    # biases (4*768 + 3072 + 768) and two LayerNorms (2 * 2 * 768) per block
    non_prunable = 12 * (4 * 768 + 3072 + 768 + 4 * 768)
    assert counts["prunable"] == prunable == 84_934_656
    assert counts["non_prunable_blocks"] == non_prunable == 119_808
    budget = make_budget(counts, 0.10)
    assert budget.target == math.floor(0.10 * 85_054_464) == 8_505_446
    assert budget.density == pytest.approx((8_505_446 - 119_808) / 84_934_656)
    assert make_budget(counts, 5_000_000).target == 5_000_000
    # a rank-r factor of a 768x768 matrix costs r * (768 + 768): it saves nothing until r < 384
    assert 384 * (768 + 768) == 768 * 768
    with pytest.raises(ConfigError, match="infeasible: the non-prunable block parameters"):
        make_budget(counts, 0.001)
    with pytest.raises(ConfigError, match="exceeds the dense encoder blocks"):
        make_budget(counts, 90_000_000)


@pytest.mark.parametrize("arch", ["bert-large-uncased", "roberta-large"])
def test_large_architectures_are_pruned_by_architecture_map(arch: str) -> None:
    with torch.device("meta"):
        model = MultitaskModel(load_encoder(f"configs/arch/{arch}", random_init=True),
                               {"rte": 2})
    hook = build_pruning(pruning_settings(method="movement", budget=0.1), 100)[0]
    hook.setup(model)
    kinds = [(kind, idx) for kind, idx, m in prunable_modules(model) if isinstance(m, MaskedLinear)]
    assert len(kinds) == 24 * 6
    assert hook.budget.prunable == 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)


@pytest.mark.parametrize(("value", "free"), [("1", False), ("", True)])
def test_mtp_accelerator_paths_makes_a_cpu_run_take_the_accelerator_paths(value: str, free: bool) -> None:
    """MTP_ACCELERATOR_PATHS=1 (bench/behaviour_digest.py --accelerator-paths) makes the hooks take the paths they
    take on an accelerator for a whole process, not only inside `accelerator_paths()`."""
    code = "import torch; from mtp.pruning.base import host_reads_are_free; print(host_reads_are_free(torch.ones(1)))"
    env = dict(os.environ, MTP_ACCELERATOR_PATHS=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(free)

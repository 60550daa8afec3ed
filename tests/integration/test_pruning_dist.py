"""Pruning in real 2-rank DeepSpeed jobs: every method lands within the budget, masks agree across ZeRO stages
(the runs of the `zero_runs` fixture; their resume is in test_distributed.py), bf16 runs, exports load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from mtp.pruning import pruned_methods
from tests.conftest import ROOT, launch, results
from tests.integration.conftest import PRUNE

# zero_runs is shared with test_distributed.py (one xdist worker runs both); method_runs is this module's
pytestmark = pytest.mark.slow  # the tests that read the shared runs share an xdist group (conftest.py)
TINY = "configs/tiny.yaml"


def masks(out: Path) -> dict[str, np.ndarray]:
    state = load_file(str(out / "final" / "model.safetensors"))
    return {k: v.numpy() for k, v in state.items() if k.endswith(".mask") or k.endswith(".keep")}


# every registered method, with the extra keys its run here takes
METHODS = {method: {"movement": ["pruning.scope=global"]}.get(method, []) for method in pruned_methods()}
# how far below the budget a method may end: one rank of the largest tiny matrix, one head (4 x 32 x 16 + 3 x 16)
GRANULARITY = {"rank": 32 + 64, "structured": 4 * 32 * 16 + 3 * 16}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory, zero_runs: dict[int, Path]) -> dict[str, Path]:
    outs = {"movement": zero_runs[2]}  # global movement under ZeRO-2: the shared ZeRO runs have it
    for method, extra in METHODS.items():
        if method in outs:
            continue
        out = tmp_path_factory.mktemp(method)
        launch(["--config", TINY, f"pruning.method={method}", *PRUNE, *extra, f"output_dir={out}"])
        outs[method] = out
    return outs


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_lands_within_the_budget(method_runs: dict[str, Path], method: str) -> None:
    out = method_runs[method]
    res = results(out)
    report = res["pruning"]
    assert report["method"] == method and report["within_budget"]
    assert report["kept_blocks"] <= report["budget"] == int(0.3 * res["params"]["encoder_blocks"])
    assert report["budget"] - report["kept_blocks"] < GRANULARITY.get(method, 1)
    if method == "structured":  # a removed head or unit takes its biases with it: kept counts them, per_type not
        assert len(report["kept_heads_per_layer"]) == len(report["kept_units_per_layer"]) == 2
    else:
        assert sum(report["kept_prunable_per_type"].values()) + report["non_prunable"] == report["kept_blocks"]
    assert set(report["kept_prunable_per_layer"]) == {"0", "1"}
    if method == "rank":
        assert "lambda1" in report and sum(report["kept_ranks"].values()) > 0
    meta = json.loads((out / "final" / "mtp.json").read_text())
    assert meta["pruning"]["kept_blocks"] == report["kept_blocks"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    expected = {"pruning/kept_blocks", "pruning/budget", "pruning/kept_per_layer/1", "pruning/kept_per_type/ffn_in"}
    expected |= {"rank": {"pruning/lambda1", "pruning/lambda2", "pruning/target_fraction"},
                 "structured": {"pruning/kept_heads", "pruning/kept_units"}}.get(
                     method, {"pruning/threshold", "pruning/target_density"})
    assert expected <= tags, sorted(tags)


def test_same_seed_and_data_give_the_same_masks_under_every_zero_stage(zero_runs: dict[int, Path]) -> None:
    reference = masks(zero_runs[0])
    assert len(reference) == 12 and all(0 < m.mean() < 1 for m in reference.values())
    for stage in (1, 2, 3):
        other = masks(zero_runs[stage])
        assert other.keys() == reference.keys()
        differing = sum(int((other[k] != reference[k]).sum()) for k in reference)
        total = sum(m.size for m in reference.values())
        assert differing == 0, f"ZeRO-{stage}: {differing} of {total} mask entries differ from ZeRO-0"
        assert results(zero_runs[stage])["pruning"]["kept_blocks"] == results(zero_runs[0])["pruning"]["kept_blocks"]


@pytest.mark.parametrize(("arch", "method", "stage"), [("tiny-bert", "movement", 2), ("tiny-roberta", "rank", 3),
                                                       ("tiny-roberta", "structured", 3)])
def test_pruning_under_bf16(tmp_path: Path, arch: str, method: str, stage: int) -> None:
    ds = json.loads((ROOT / "ds_configs" / f"cpu_zero{stage}.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "bf16.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    launch(["--config", TINY, f"encoder.name=configs/arch/{arch}", f"pruning.method={method}", *PRUNE,
            f"train.deepspeed_config={tmp_path}/bf16.json", f"output_dir={out}"])
    res = results(out)
    assert res["precision"] == "bf16" and res["zero_stage"] == stage and res["pruning"]["within_budget"]
    assert res["pruning"]["budget"] - res["pruning"]["kept_blocks"] < GRANULARITY.get(method, 96)
    # the run saves bf16 weights; its export computes in float32 and scores as those weights do in float32
    proc = subprocess.run([sys.executable, "-m", "mtp", "export", str(out), "--verify", "--no-onnx"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["ok"] and report["trained_in"] == ["bfloat16"], report


@pytest.mark.parametrize("method", ["movement", "rank", "structured"])
def test_export_is_smaller_loads_with_transformers_and_scores_the_same(method_runs: dict[str, Path],
                                                                       method: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from mtp.export import load_compact
    from mtp.run_folder import build_dense_model, read_final

    run = method_runs[method]
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "mtp", "export", str(run), "--out", str(export), "--verify"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["ok"] and report["max_logit_diff_compact"] <= 1e-4 and report["max_score_diff"] <= 1e-2
    # the ONNX form of the compact encoder, run by onnxruntime, gives its hidden states
    assert (export / "onnx" / "encoder.onnx").is_file() and report["max_hidden_diff_onnx"] <= 1e-4
    # the model card: method, budget, what is kept, the dev scores, latency against dense, the command
    card = (export / "README.md").read_text()
    assert f"| method | `{method}` |" in card and "## Dev scores" in card and "## Latency" in card
    assert report["latency"]["latency_ratio"] > 0 and "bash launch.sh --config config.yaml" in card
    # really smaller: the compact encoder blocks take less disk than the dense ones
    compact_bytes = (export / "compact" / "model.safetensors").stat().st_size
    cfg, meta, state = read_final(run)
    trained = build_dense_model(cfg, meta, state)
    dense_bytes = 4 * sum(p.numel() for p in trained.parameters())  # the dense fold, float32
    assert compact_bytes < dense_bytes
    # plain transformers: the encoder, and a sequence-classification model per task (cls pooling)
    # (a structured export ships its modeling code: the encoder at its kept shapes, really smaller on disk)
    encoder = AutoModel.from_pretrained(export / "hf" / "encoder", trust_remote_code=True)
    dense_blocks = sum(p.numel() for p in trained.encoder.encoder.parameters())
    if method == "structured":
        assert sum(p.numel() for p in encoder.encoder.parameters()) == results(run)["pruning"]["kept_blocks"]
    else:
        assert sum(p.numel() for p in encoder.encoder.parameters()) == dense_blocks
    clf = AutoModelForSequenceClassification.from_pretrained(export / "hf" / "rte", trust_remote_code=True).eval()
    x = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(clf(input_ids=x, attention_mask=mask).logits,
                                   trained("rte", input_ids=x, attention_mask=mask)["logits"], atol=1e-5, rtol=1e-5)
        compact = load_compact(export / "compact")
        torch.testing.assert_close(compact("stsb", input_ids=x, attention_mask=mask)["logits"],
                                   trained("stsb", input_ids=x, attention_mask=mask)["logits"], atol=1e-4, rtol=1e-4)

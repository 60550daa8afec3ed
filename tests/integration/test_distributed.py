"""Real 2-rank DeepSpeed jobs through launch.sh: tiny encoders on real GLUE rows, under every ZeRO stage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, launch, results
from tests.integration.conftest import FIXED_PHASE, PRUNE
from tests.integration.test_pruning_dist import masks

# zero_runs (a session fixture, four 2-rank jobs) is shared with test_pruning_dist.py: one xdist worker runs both
pytestmark = pytest.mark.slow  # the tests that read the shared ZeRO runs share an xdist group (conftest.py)
TINY = "configs/tiny.yaml"


def losses(res: dict) -> np.ndarray:
    return np.array([h["loss"] for h in res["loss_history"]])


def test_every_zero_stage_trains_and_agrees(zero_runs: dict[int, Path]) -> None:
    reference = results(zero_runs[0])
    assert reference["finished"] and reference["steps"] == 8 and reference["world_size"] == 2
    assert set(reference["tasks"]) == {"rte", "stsb"}
    for stage, out in zero_runs.items():
        res = results(out)
        assert res["zero_stage"] == stage and res["precision"] == "fp32"
        # the same seed and data give the same training, whatever the partitioning (fp32 rounding aside)
        np.testing.assert_allclose(losses(res), losses(reference), rtol=2e-3, atol=1e-4)
        assert res["mean_score"] == pytest.approx(reference["mean_score"], abs=0.5)
        assert (out / "checkpoints" / "step_8" / "rng_rank1.safetensors").is_file()


def test_results_and_tensorboard_hold_what_a_user_watches(zero_runs: dict[int, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = zero_runs[2]
    res = results(out)
    assert res["tokens_seen"] > 0 and res["wall_time_s"] > 0
    assert set(res["tasks"]["stsb"]["dev"]["dev"]) == {"pearson", "spearman", "score"}
    assert res["params"]["encoder_blocks"] == 2 * (4 * (32 * 32 + 32) + 2 * 2 * 32 + 32 * 64 + 64 + 64 * 32 + 32)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss/rte", "train/loss/stsb", "train/lr/decay", "train/tokens_per_s",
                "dev/mean_score", "dev/stsb/dev/pearson", "dev/rte/dev/accuracy", "train/task_share/rte"):
        assert tag in tags, sorted(tags)
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_stopped_and_resumed_run_matches_uninterrupted(zero_runs: dict[int, Path], tmp_path: Path,
                                                      tiny_pretrained: Path) -> None:
    """Stopped after 4 of 8 steps, in the middle of the pruning ramp, and resumed through the fixed-mask phase: the
    same losses, scores, tokens and masks as the uninterrupted run (the pruning state travels in the checkpoint)."""
    reference = results(zero_runs[2])  # the uninterrupted 8-step ZeRO-2 run
    out = tmp_path / "resumed"
    common = ["--config", TINY, "pruning.method=movement", *PRUNE, *FIXED_PHASE, "pruning.scope=global",
              f"encoder.name={tiny_pretrained}", "encoder.random_init=false",
              "train.deepspeed_config=ds_configs/cpu_zero2.json", f"output_dir={out}"]
    launch([*common, "train.stop_after_steps=4"])
    half = results(out)
    assert not half["finished"] and half["steps"] == 4
    launch([*common, "--resume"])
    res = results(out)
    assert res["finished"] and res["steps"] == 8
    np.testing.assert_allclose(losses(res), losses(reference), rtol=1e-5, atol=1e-6)
    for task, scores in reference["tasks"].items():
        assert res["tasks"][task]["score"] == pytest.approx(scores["score"], abs=1e-3)
    assert res["tokens_seen"] == reference["tokens_seen"]
    resumed, uninterrupted = masks(out), masks(zero_runs[2])
    assert resumed.keys() == uninterrupted.keys() and all(np.array_equal(resumed[k], uninterrupted[k])
                                                         for k in uninterrupted)


def test_tiny_roberta_with_custom_task_and_rank_pruning_under_zero3(tmp_path: Path) -> None:
    """A RoBERTa-style encoder, a task from CSV files, gradient accumulation and rank pruning under ZeRO-3 with every
    tensor partitioned: the run trains, and once built and at the end each of 2 ranks holds half of every parameter
    (the encoder is built partitioned, the heads and the P and Q that rank pruning swaps in too)."""
    rows = ["text,label"] + [f"sample {i} {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
                             for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:13]) + "\n")
    ds = json.loads((ROOT / "ds_configs/cpu_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # by default tensors under 1e5 elements
    (tmp_path / "zero3.json").write_text(json.dumps(ds))  # stay whole on every rank: most of them at this scale
    out = tmp_path / "run"
    launch(["--config", TINY, "encoder.name=configs/arch/tiny-roberta",
            f"train.deepspeed_config={tmp_path / 'zero3.json'}", "train.grad_accum=2", "train.max_steps=4",
            "pruning.method=rank", "pruning.budget=0.5",
            f"tasks=[{{name: rte, max_train_examples: 64, max_dev_examples: 30}}, {{name: polarity, "
            f"train_file: {tmp_path}/train.csv, dev_file: {tmp_path}/dev.csv, text_columns: [text], "
            "label_column: label, labels: [neg, pos]}]", f"output_dir={out}"])
    res = results(out)
    assert res["finished"] and res["zero_stage"] == 3 and res["steps"] == 4
    assert sum(h["loss"] > 0 for h in res["loss_history"]) == 2  # log_every=2: two windows of 2 optimizer steps
    assert res["data"]["polarity"]["dev_used"] == {"dev": 12}
    assert 0 <= res["tasks"]["polarity"]["dev"]["dev"]["accuracy"] <= 100
    assert res["pruning"]["method"] == "rank"
    report = res["zero3_parameters"]
    assert len(report["held_per_rank"]) == 2 and len(report["held_at_build_per_rank"]) == 2
    assert report["largest_share"] <= 0.5 + 1e-3, report  # half of each tensor, rounded up


def test_a_zero3_rank_never_holds_more_than_its_share_of_the_parameters(zero_runs: dict[int, Path]) -> None:
    """Movement under ZeRO-3 with every tensor partitioned (the shared runs' ZeRO-3 config): the encoder, the heads
    and the scores movement swaps in are partitioned from the start, so each of 2 ranks holds half of every
    parameter once built and at the end."""
    report = results(zero_runs[3])["zero3_parameters"]
    assert len(report["held_per_rank"]) == 2 and len(report["held_at_build_per_rank"]) == 2
    assert report["largest_share"] <= 0.5 + 1e-3, report  # half of each tensor, rounded up


def test_two_nodes_on_localhost_without_ssh(tmp_path: Path) -> None:
    """Two 'nodes' (one rank each) started separately with --no_ssh and a node rank, as on a cluster."""
    import os
    import sys

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    procs = [subprocess.Popen(["bash", "launch.sh", "--nproc", "1", "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--config", TINY,
                               f"output_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    res = results(out)
    assert res["finished"] and res["world_size"] == 2


def test_a_terminated_job_cleans_up_and_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGTERM to the job's process group (what a scheduler sends): the ranks exit through atexit, so DeepSpeed's
    shared-memory buffers go, and the checkpoints written so far resume the run."""
    import os
    import signal
    import sys
    import time

    out = tmp_path / "stopped"
    port = free_port()
    env = dict(os.environ, MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(ROOT / "launch.sh"), "--nproc", "2", "--config", TINY,
                             "train.max_steps=100000", "train.checkpoint_every=2", "train.keep_checkpoints=1",
                             f"output_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        assert (out / "checkpoints" / "latest").exists(), "no checkpoint was written"
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher, its per-node launcher and the ranks
        proc.wait(timeout=120)
        for _ in range(60):  # the ranks may outlive the launcher by a moment
            if not subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout:
                break
            time.sleep(1)
    finally:  # never leave a 100,000-step job behind
        subprocess.run(["pkill", "-KILL", "-f", str(out)])
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"shared-memory buffers left behind: {[p.name for p in left]}"
    done = (out / "checkpoints" / "latest").read_text().strip()
    launch(["--config", TINY, "train.max_steps=100000", f"train.stop_after_steps={int(done.split('_')[-1]) + 2}",
            f"output_dir={out}", "--resume"])
    res = results(out)
    assert res["steps"] == int(done.split("_")[-1]) + 2 and not res["finished"]


def resume_from_a_rewritten_checkpoint(tmp_path: Path, method: str, rewrite: Any) -> list[str]:
    """A tiny `method` run stopped at its step-2 checkpoint, its saved module state rewritten by `rewrite`, then
    resumed: the exit code must be 2; returns the lines that start with `mtp: error:`."""
    import torch

    out = tmp_path / "run"
    common = ["--config", TINY, f"pruning.method={method}", "pruning.budget=0.5", "train.max_steps=4",
              "train.checkpoint_every=2", "train.deepspeed_config=ds_configs/cpu_zero0.json", f"output_dir={out}"]
    launch([*common, "train.stop_after_steps=2"], nproc=1)
    states = out / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=False)
    saved["module"] = rewrite(saved["module"])
    torch.save(saved, states)
    proc = launch([*common, "--resume"], nproc=1, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("mtp: error:")]


def test_a_rank_checkpoint_from_before_the_fused_factors_is_refused_in_one_line(tmp_path: Path) -> None:
    """A rank run checkpointed when P and Q were two parameters (its model state holds `.P` and `.Q`, not
    `.factors`) is not resumed with DeepSpeed's raw state-dict error: one line names the folder and what to do, exit
    2."""

    def split_factors(state: dict[str, Any]) -> dict[str, Any]:  # the layout before: P's rows, then Q
        module = {}
        for name, value in state.items():
            if name.endswith(".factors"):
                rank = value.shape[1]
                out_features = state[name[: -len("factors")] + "bias"].shape[0]
                module[name[: -len("factors")] + "P"] = value[:out_features].clone()
                module[name[: -len("factors")] + "Q"] = value[out_features:].reshape(rank, -1).clone()
            else:
                module[name] = value
        return module

    lines = resume_from_a_rewritten_checkpoint(tmp_path, "rank", split_factors)
    assert len(lines) == 1 and "from before rank kept P and Q in one parameter" in lines[0], lines


def test_a_movement_checkpoint_from_before_the_block_scores_is_refused_in_one_line(tmp_path: Path) -> None:
    """A movement run checkpointed when every matrix had its own score parameter (`PATH.scores`, not one
    `mtp_scores` per block) is refused from the checkpoint's keys before DeepSpeed loads it: one line, exit 2."""

    def per_matrix_scores(state: dict[str, Any]) -> dict[str, Any]:
        assert any(k.endswith(".mtp_scores") for k in state)
        return {(k[: -len("mtp_scores")] + "attention.self.query.scores" if k.endswith(".mtp_scores") else k): v
                for k, v in state.items()}

    lines = resume_from_a_rewritten_checkpoint(tmp_path, "movement", per_matrix_scores)
    assert len(lines) == 1 and "from before movement kept one score parameter per encoder block" in lines[0], lines

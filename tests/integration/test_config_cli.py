"""`mtp check` and launch.sh: the one-line errors (exit code 2) before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtp", "check", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tasks.0.name=rtee"], "tasks: unknown task 'rtee'"),
        (["train.deepspeed_config=ds_configs/nope.json"], "train.deepspeed_config: file not found"),
        (["encoder.config_overrides.num_layerz=1"], "encoder.config_overrides.num_layerz: not a field"),
        (["data.glue_dir=/nonexistent/glue"], "data.glue_dir: not a folder"),
        (["train.micro_batch_size=64"], "tasks.rte: 64 training rows is fewer than one global batch"),
        (["pruning.method=movement", "pruning.budget=0.001"], "pruning.budget: 17 parameters is infeasible"),
        (["pruning.method=rank"], "pruning.budget: method 'rank' needs a budget below the dense size"),
    ],
)
def test_cli_check_fails_with_one_line_and_exit_2(overrides: list[str], expected: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from mtp.cli import main  # in this process: the CLI's own entry point (the subprocess path is tested below)

    code = main(["check", "--config", str(TINY), "--world-size", "2", *overrides])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


def test_cli_missing_config_file() -> None:
    proc = check("--config", "no/such.yaml")
    assert proc.returncode == 2 and "config file not found: no/such.yaml" in proc.stderr


def test_label_outside_declared_set_names_file_and_row(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\ngood movie,pos\nbad movie,neg\nodd movie,meh\n")
    (tmp_path / "dev.csv").write_text("text,label\nfine,pos\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.read_text().replace("tasks:\n", f"""tasks:
  - name: sentiment
    train_file: {tmp_path}/train.csv
    dev_file: {tmp_path}/dev.csv
    text_columns: [text]
    label_column: label
    labels: [neg, pos]
""", 1))
    proc = check("--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mtp: error: {tmp_path}/train.csv: row 4: label 'meh' is not one of ['neg', 'pos']"


def test_ds_config_conflict_and_scheduler_are_refused(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}')
    proc = check("--config", str(TINY), f"train.deepspeed_config={ds}")
    assert proc.returncode == 2 and "disagrees with train.micro_batch_size=4" in proc.stderr
    ds.write_text('{"scheduler": {"type": "WarmupLR"}}')
    proc = check("--config", str(TINY), f"train.deepspeed_config={ds}")
    assert proc.returncode == 2 and "'scheduler' is set by mtp" in proc.stderr


def test_resume_without_checkpoint_and_overwrite_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = check("--config", str(TINY), "--resume", f"output_dir={out}")
    assert proc.returncode == 2 and "--resume: no checkpoint" in proc.stderr
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_4")
    proc = check("--config", str(TINY), f"output_dir={out}")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    (out / "checkpoints" / "latest").write_text("")  # a write cut short: refused in one line, not in DeepSpeed's load
    proc = check("--config", str(TINY), "--resume", f"output_dir={out}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"mtp: error: --resume: {out}/checkpoints/latest is empty (a checkpoint's write was cut short): write the name "
        "of its last complete checkpoint folder into it, e.g. step_500")


def test_launch_sh_refuses_bad_config_before_starting(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "launch.sh", "--config", str(TINY), "train.epochs=-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.epochs: Input should be greater than 0" in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()

"""launch.sh refuses a malformed hostfile with one line naming the file and the line, before any process starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT


def launch_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_malformed_hostfile_line_is_named_with_exit_2(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\n# a comment\n\nnode-b slots=two\n")
    proc = launch_sh("--hostfile", str(hostfile), "--config", "configs/tiny.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"launch.sh: error: {hostfile} line 4: expected 'HOST slots=N', got 'node-b slots=two'"]


def test_the_example_hostfile_passes_the_check(tmp_path: Path) -> None:
    """It then stops at the next check (no --node_rank with --no_ssh): the hostfile itself was accepted."""
    proc = launch_sh("--hostfile", str(ROOT / "hostfile.example"), "--no_ssh", "--config", "configs/tiny.yaml")
    assert proc.returncode == 2 and "--no_ssh needs --node_rank" in proc.stderr

"""launch.sh refuses a malformed hostfile, and a rendezvous port that another job holds, with one line and exit 2,
before any process starts."""

from __future__ import annotations

import socket
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


def test_a_taken_master_port_is_refused_in_one_line_before_anything_starts() -> None:
    with socket.socket() as job:  # another job's rendezvous
        job.bind(("127.0.0.1", 0))
        job.listen()
        port = job.getsockname()[1]
        proc = launch_sh("--master_port", str(port), "--config", "configs/tiny.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"launch.sh: error: --master_port {port} is taken (another job on this machine?): give a free port, or leave "
        "--master_port out and a free one is picked"]

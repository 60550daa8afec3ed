"""Shared fixtures: the GLUE folder, a free port, and a helper that runs launch.sh for real.

Two layers: tests/unit/ runs without GLUE data (a test there that needs it asks for the `glue_dir` fixture, which
skips without it); tests/integration/ trains real tiny runs on GLUE rows and is skipped as a whole without them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _glue_dir() -> Path | None:
    env = os.environ.get("MTP_GLUE_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data" / "glue")
    for c in candidates:
        if (c / "RTE" / "train.tsv").is_file():
            return c.resolve()
    return None


GLUE_DIR = _glue_dir()
if GLUE_DIR is not None:
    os.environ["MTP_GLUE_DIR"] = str(GLUE_DIR)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The canonical GLUE files; the test is skipped without them (set MTP_GLUE_DIR)."""
    if GLUE_DIR is None:
        pytest.skip("GLUE files not found: set MTP_GLUE_DIR to a folder with the canonical GLUE TSVs")
    return GLUE_DIR


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/arch/tiny-bert with seeded random weights saved as a checkpoint: runs that start from it start from
    the same weights under every ZeRO stage (random_init draws other weights under ZeRO-3's partitioned build)."""
    import torch

    from mtp.model import load_encoder

    folder = tmp_path_factory.mktemp("tiny-pretrained")
    torch.manual_seed(0)
    load_encoder(str(ROOT / "configs/arch/tiny-bert"), random_init=True).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtp-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, timeout: int = 600, extra_env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run `bash launch.sh` as a user would; returns the finished process."""
    port = free_port()
    env = dict(os.environ, MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHON=sys.executable, **(extra_env or {}))
    proc = subprocess.run(["bash", str(ROOT / "launch.sh"), "--nproc", str(nproc), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    if proc.returncode == 0:  # DeepSpeed's CPU shared-memory allreduce buffers are removed by the ranks at exit
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert not left, f"shared-memory buffers left behind: {[p.name for p in left]}"
    return proc


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())

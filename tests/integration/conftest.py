"""Integration runs read GLUE rows: without the files every test here is skipped (the unit layer still runs)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _needs_glue(glue_dir: Path) -> None:
    """Skip when the GLUE files are missing (see tests/conftest.py)."""

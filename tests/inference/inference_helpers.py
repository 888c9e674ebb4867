"""Helpers shared by the inference tests (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_FACES = Path(__file__).parents[2] / ".." / "shared" / "faces"


def shared_folder(name: str) -> Path:
    """A folder of the shared face photos, or skip the test when this checkout has none."""
    folder = SHARED_FACES / name
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.skip(f"shared face photos not found at {folder.resolve()} (not part of the repository)")
    return folder

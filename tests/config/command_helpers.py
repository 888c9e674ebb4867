"""Helpers of the config / command tests, importable by the test modules (``from command_helpers
import ...``; a ``conftest`` import would be ambiguous when several test folders are collected)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def data_dir_of(faces: Path) -> Path:
    """The ``paths.data_dir`` whose quickstart config reads ``faces`` (``<data_dir>/quickstart_faces/<key>``)."""
    return faces.parent.parent


def command_env(**extra: str) -> dict[str, str]:
    """Environment of a test command: one thread per process, W&B offline, this folder importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1",
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300, check: bool = True, **env: str):
    """``python -m <module> <args>`` in ``cwd``; fails the test with the output tail when it fails (``check``)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=command_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"`python -m {module} {' '.join(args)}` failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc

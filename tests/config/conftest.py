"""Helpers for the config / command tests: compose the packaged config tree, run the commands.

* ``compose_cfg(*overrides, config_name="train")``: the composed config as ``codeformer-train``
  would see it (``paths.*`` pointed into the test's tmp folder); Hydra's global state is cleared
  after the test.
* ``run_command(module, *overrides, env=None, timeout=...)``: runs ``python -m <module> ...`` in a
  subprocess (how Lightning's DDP launcher needs it: it re-runs the command for rank 1) and returns
  the completed process; fails the test with the output tail when the command fails.
* ``face_folder``: a session-wide quickstart face folder (32 px, built from scikit-image's faces).
* ``quickstart_run``: one session-wide ``codeformer-train experiment=quickstart`` run at 6 steps per
  stage (the README's main job, its files and its printed output), shared by the tests that inspect it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from command_helpers import data_dir_of, run_module
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from codeformer_lightning.quickstart import cached_face_folder

CONF_MODULE = "codeformer_lightning.conf"


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|num_workers|LeafSpec|litlogger|log_every_n_steps).*")
        yield


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory) -> Path:
    """The 32 px quickstart faces where ``paths.data_dir=<face_folder.data_dir>`` finds them."""
    data_dir = tmp_path_factory.mktemp("data")
    return cached_face_folder(data_dir / "quickstart_faces", size=32)


@pytest.fixture
def compose_cfg(tmp_path):
    GlobalHydra.instance().clear()

    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def run_command(tmp_path):
    def run(module: str, *overrides: str, timeout: float = 300, cwd: Path | None = None, **env: str):
        return run_module(module, *overrides, cwd=cwd or tmp_path, timeout=timeout, **env)

    return run


@dataclass
class QuickstartRun:
    """One run of the README's main job at a few steps: its folder and everything it printed."""

    folder: Path
    stdout: str
    stderr: str

    @property
    def log(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="session")
def quickstart_run(face_folder, tmp_path_factory) -> QuickstartRun:
    """``codeformer-train experiment=quickstart`` for 6 steps per stage (validation, logging and checkpoints
    every 3) with the default callbacks, progress bar and model summary, as a user runs it (output to a pipe)."""
    cwd = tmp_path_factory.mktemp("quickstart_run")
    proc = run_module(
        "codeformer_lightning.commands.train", "experiment=quickstart", "trainer.max_steps=6",
        "trainer.val_check_interval=3", "trainer.log_every_n_steps=3", "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.save_top_k=-1", f"paths.data_dir={data_dir_of(face_folder)}",
        cwd=cwd, timeout=900, WANDB_MODE="disabled",
    )
    (folder,) = [p for p in (cwd / "outputs" / "quickstart").iterdir() if p.is_dir()]
    return QuickstartRun(folder, proc.stdout, proc.stderr)

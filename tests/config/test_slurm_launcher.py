"""launcher=slurm renders a correct sbatch script through the real submitit launcher (no SLURM needed).

The command runs in-process up to the point where submitit would call ``sbatch``; that call is
intercepted and the generated submission script is checked.
"""

from __future__ import annotations

import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

submitit = pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


class _Submitted(Exception):
    """Raised instead of running sbatch; carries the submission script."""


@pytest.fixture
def intercept_sbatch(monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    def fake_command(self, submission_file_path):
        raise _Submitted(submission_file_path.read_text())

    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", fake_command)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is installed"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_slurm_launcher_renders_multinode_sbatch(intercept_sbatch, monkeypatch, tmp_path):
    from codeformer_lightning.commands.train import main

    argv = [
        "codeformer-train", "-m", "launcher=slurm", "experiment=vqgan", "trainer=multinode",
        "trainer.num_nodes=2", "trainer.devices=4", "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(_Submitted) as submitted:
        main()
    script = str(submitted.value)
    directives = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    # one task per GPU on each of the 2 nodes: what Lightning's SLURMEnvironment expects
    for expected in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                     "--time=600", "--job-name=vqgan"):
        assert expected in directives, f"{expected} missing from:\n{script}"
    assert "srun" in script and "submitit.core._submit" in script
    # the job's files go under the sweep folder
    assert str(tmp_path / "sweep" / ".submitit") in script
    # SIGUSR1 two minutes before the time limit, to every task: checkpoint, requeue (not submitit's USR2)
    assert "--signal=USR1@120" in directives and not any(d.startswith("--signal=USR2") for d in directives)


def test_slurm_runs_resume_automatically_and_requeue_through_lightnings_slurm_environment(compose_cfg):
    import signal

    from hydra.utils import instantiate
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from codeformer_lightning.training import AtomicCheckpointIO

    cfg = compose_cfg("launcher=slurm", "experiment=vqgan", "trainer=multinode")
    assert cfg.ckpt_path == "auto"  # a requeued job continues from its run folder's newest valid checkpoint
    plugins = instantiate(cfg.trainer.plugins)
    cluster = next(p for p in plugins if isinstance(p, SLURMEnvironment))
    assert cluster.auto_requeue and cluster.requeue_signal == signal.SIGUSR1
    assert any(isinstance(p, AtomicCheckpointIO) for p in plugins)
    assert "preemption" in cfg.callbacks and "random_state" in cfg.callbacks

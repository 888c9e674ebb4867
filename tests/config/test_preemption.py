"""Preemption (issue 14): ``launcher=slurm``'s settings on a CPU run that believes it is a SLURM job
(faked SLURM_* variables, a stub ``scontrol`` on PATH that records its calls). A signal sent to the
running process leads to a checkpoint at the next step boundary, a requeue and an exit; the next
start of the same command (``ckpt_path=auto``) continues from that checkpoint, and ends where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codeformer_lightning.quickstart import cached_face_folder

TRAIN = "codeformer_lightning.commands.train"
JOB_ID = "4242"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cached_face_folder(root / "quickstart_faces", size=32)  # where data=sample_faces looks for it
    return root


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[dict[str, str], Path]:
    """The environment of SLURM job 4242 (one task) with ``scontrol`` a stub recording its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="train",
        SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
        SLURM_JOB_NUM_NODES="1", SLURM_NODELIST="localhost", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        WANDB_MODE="disabled", HYDRA_FULL_ERROR="1",
    )  # fmt: skip
    return env, calls


def _command(run_dir: Path, data_dir: Path, max_steps: int) -> list[str]:
    # launcher=slurm without -m: its job settings (plugins, ckpt_path=auto) in this process
    return [
        sys.executable, "-m", TRAIN, "launcher=slurm", "experiment=quickstart_vqgan", f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=2", "model.disc_start_step=3", "logger=csv",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]  # fmt: skip


def _signal_after_first_checkpoint(
    cmd, env, log: Path, run_dir: Path, signum: int
) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while not (run_dir / "checkpoints" / "last.ckpt").exists():  # polling: training is under way
            assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        proc.send_signal(signum)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc


@pytest.mark.parametrize(
    "signum",
    [signal.SIGUSR1, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["SIGUSR1", "SIGTERM"],
)
def test_signal_leads_to_checkpoint_requeue_exit_and_the_next_start_resumes(
    tmp_path, data_dir, fake_slurm, signum
):
    env, calls = fake_slurm
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = _command(run_dir, data_dir, max_steps=10)
    proc = _signal_after_first_checkpoint(cmd, env, log, run_dir, signum)
    text = log.read_text()
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert proc.returncode == 1, text[-4000:]
    assert (
        f"stopped by {signal.Signals(signum).name} at step" in text and f"SLURM job {JOB_ID} requeued" in text
    )
    assert calls.read_text().split() == ["requeue", JOB_ID]
    step = torch.load(preempted, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= step < 10  # written at a step boundary, before the end
    assert not (run_dir / "weights").exists()  # a preempted run exports nothing

    # the requeued job: the same command, in the same folder
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert text.returncode == 0, text.stdout[-3000:] + text.stderr[-3000:]
    assert f"ckpt_path=auto: resuming from {preempted}" in text.stdout + text.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10
    if signum == signal.SIGTERM:  # and it ends exactly where an uninterrupted run ends
        reference = tmp_path / "reference"
        subprocess.run(
            _command(reference, data_dir, 10), env=env, check=True, capture_output=True, timeout=600
        )
        a = load_file(run_dir / "weights" / "quickstart_vqgan.safetensors")
        b = load_file(reference / "weights" / "quickstart_vqgan.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0

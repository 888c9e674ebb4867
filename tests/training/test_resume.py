"""Exact resumption (issue 14), the way it fails in practice: ``codeformer-train`` subprocesses killed
with SIGKILL right after a checkpoint appears, restarted with ``ckpt_path=auto``, and their final
weights (exported EMA network, every tensor of ``last.ckpt``: weights, EMA, discriminator, codebook
buffers, optimiser moments) compared with an uninterrupted run's.

Runs: 12 steps of the quickstart stages (32 px, 100 faces, batches of 16: 6 steps per epoch),
checkpoints and validation every 3 steps, so the kill at step 3 is mid-epoch and skips the
validation the uninterrupted run makes right after that checkpoint, and step 6 ends an epoch. The
default suite runs stage I with 2 persistent workers and a truncated ``last.ckpt`` (``auto`` must
skip it); ``-m slow`` runs every stage with 0 and 2 workers, an epoch-end kill and 2-process DDP,
and prints the max |diff| table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codeformer_lightning.training import atomic_torch_save, find_resume_checkpoint, resolve_ckpt_path
from codeformer_lightning.training.resume import checkpoint_problem

STEPS, EVERY = 12, 3
TOLERANCE = 1e-6
STAGE_ARGS = {
    # the GAN from step 2 and dead-code restarts every 3 steps: every piece of state is exercised
    "vqgan": ["experiment=quickstart_vqgan", "model.disc_start_step=2", "model.dead_code_steps=3"],
    "code_predictor": ["experiment=quickstart_code_predictor"],
    "cft": [
        "experiment=quickstart_cft", "model.gan_weight=0.1", "model.disc_start_step=2",
        "model.discriminator_from=random",
    ],
}


# ----------------------------------------------------------------------------- running the command
def _env() -> dict[str, str]:
    return dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1"
    )


def train_command(stage: str, run_dir: Path, data_dir: Path, workers: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "codeformer_lightning.commands.train", *STAGE_ARGS[stage], f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={EVERY}",
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}", "callbacks.model_checkpoint.save_top_k=-1",
        f"data.num_workers={workers}", f"data.persistent_workers={workers > 0}", "logger=csv",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        *extra,
    ]  # fmt: skip


def run(cmd: list[str], log: Path, timeout: float = 600) -> str:
    with open(log, "a") as out:
        proc = subprocess.run(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd[2:])}` failed ({proc.returncode}):\n{text[-5000:]}")
    return text


def run_and_kill(cmd: list[str], log: Path, checkpoint: Path, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it (with its workers and DDP ranks) once ``checkpoint`` exists."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint.exists():  # polling the folder; the file appears complete (atomic rename)
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended ({proc.returncode}) before writing {checkpoint}:\n{log.read_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {checkpoint} after {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported network and every tensor of ``last.ckpt`` (model state and optimiser states)."""
    tensors = {}
    for path in sorted((run_dir / "weights").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    tensors.update({f"state_dict:{k}": v for k, v in ckpt["state_dict"].items()})
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for p, state in opt["state"].items():
            tensors.update({f"optimizer{i}:{p}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir):
    """Uninterrupted runs, computed once per (stage, trainer) and shared by the comparisons."""
    cache: dict[tuple, dict[str, torch.Tensor]] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(stage: str, *extra: str) -> dict[str, torch.Tensor]:
        key = (stage, *extra)
        if key not in cache:
            run_dir = root / f"{stage}_{len(cache)}"
            run(train_command(stage, run_dir, data_dir, 0, *extra), root / f"{run_dir.name}.log")
            cache[key] = final_tensors(run_dir)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def stage1_weights(tmp_path_factory, data_dir) -> Path:
    """A stage I export (2 steps) for stages II and III to start from."""
    run_dir = tmp_path_factory.mktemp("stage1")
    run(train_command("vqgan", run_dir, data_dir, 0, "trainer.max_steps=2"), run_dir / "log.txt")
    return run_dir / "weights" / "quickstart_vqgan.safetensors"


def _stage_extra(stage: str, stage1_weights) -> list[str]:
    return [] if stage == "vqgan" else [f"model.autoencoder={stage1_weights}"]


def kill_and_resume(tmp_path, data_dir, stage, workers, kill_at, *extra, truncate_last=False) -> dict:
    """Kill the run as soon as its first checkpoint (at step ``kill_at``) exists, resume with auto."""
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = train_command(stage, run_dir, data_dir, workers, *extra)
    first = [f"callbacks.model_checkpoint.every_n_train_steps={kill_at}"]
    run_and_kill(cmd + first, log, run_dir / "checkpoints" / "last.ckpt")
    steps = {
        p: torch.load(p, map_location="cpu", weights_only=True)["global_step"]
        for p in run_dir.rglob("*.ckpt")
    }
    assert max(steps.values()) == kill_at == steps[run_dir / "checkpoints" / "last.ckpt"]
    if truncate_last:  # the newest file is a truncated last.ckpt: auto must skip it, naming it
        last = run_dir / "checkpoints" / "last.ckpt"
        good = last.read_bytes()
        last.write_bytes(good[: len(good) // 2])
        newest = max(p.stat().st_mtime for p in run_dir.rglob("*.ckpt"))
        os.utime(last, (newest + 10, newest + 10))
    text = run(cmd + ["ckpt_path=auto"], log)
    if truncate_last:
        assert (
            f"ckpt_path=auto: skipping {run_dir / 'checkpoints' / 'last.ckpt'}: not a complete checkpoint"
            in text
        )
    assert f"ckpt_path=auto: resuming from {run_dir / 'checkpoints'}" in text
    assert not list(run_dir.glob("checkpoints/*-v*.ckpt"))  # the resumed run continues last.ckpt itself
    assert not list(run_dir.glob("checkpoints/.*.tmp"))  # a write the kill interrupted left nothing behind
    return final_tensors(run_dir)


# ----------------------------------------------------------------------------- the comparisons
def test_stage1_killed_with_workers_resumes_bit_identical_past_a_truncated_last_ckpt(
    tmp_path, data_dir, references
):
    resumed = kill_and_resume(tmp_path, data_dir, "vqgan", 2, EVERY, truncate_last=True)
    diff = max_abs_diff(resumed, references("vqgan"))
    print(f"\nmax |diff| vqgan, 2 workers, killed after step {EVERY}: {diff:.3g}")
    assert diff <= TOLERANCE


MATRIX = [
    ("vqgan", 0, EVERY, ()),
    ("code_predictor", 0, EVERY, ()),
    ("code_predictor", 2, EVERY, ()),
    ("cft", 0, EVERY, ()),
    ("cft", 2, EVERY, ()),
    ("vqgan", 2, 2 * EVERY, ()),  # the checkpoint that ends epoch 0
    ("vqgan", 0, EVERY, ("trainer=ddp_cpu",)),  # 2 gloo ranks: every rank's state comes back
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "workers", "kill_at", "extra"), MATRIX, ids=lambda v: str(v))
def test_killed_run_resumes_bit_identical(
    tmp_path, data_dir, references, stage1_weights, stage, workers, kill_at, extra
):
    extra = (*_stage_extra(stage, stage1_weights), *extra)
    resumed = kill_and_resume(tmp_path, data_dir, stage, workers, kill_at, *extra)
    diff = max_abs_diff(resumed, references(stage, *extra))
    ddp = " (DDP, 2 ranks)" if "trainer=ddp_cpu" in extra else ""
    print(f"\nmax |diff| {stage}{ddp}, {workers} workers, killed after step {kill_at}: {diff:.3g}")
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- checkpoint files
def _training_checkpoint(step: int) -> dict:
    return {
        "state_dict": {"w": torch.full((4,), float(step))},
        "global_step": step,
        "loops": {},
        "optimizer_states": [],
    }


def test_auto_takes_the_newest_valid_checkpoint_and_names_the_files_it_skips(tmp_path):
    ckpts = tmp_path / "checkpoints"
    atomic_torch_save(_training_checkpoint(3), ckpts / "step_00000003.ckpt")
    atomic_torch_save({"state_dict": {}}, ckpts / "weights_only.ckpt")
    atomic_torch_save(_training_checkpoint(6), ckpts / "last.ckpt")
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[:-200])
    for age, name in enumerate(["last.ckpt", "weights_only.ckpt", "step_00000003.ckpt"]):
        os.utime(ckpts / name, (1e9 - age, 1e9 - age))
    with pytest.warns(UserWarning) as caught:
        found = find_resume_checkpoint(tmp_path)
    assert found == ckpts / "step_00000003.ckpt"
    messages = [str(w.message) for w in caught]
    assert any(f"skipping {ckpts / 'last.ckpt'}: not a complete checkpoint" in m for m in messages)
    assert any(f"skipping {ckpts / 'weights_only.ckpt'}: not a training checkpoint" in m for m in messages)
    assert find_resume_checkpoint(tmp_path / "nothing_here") is None
    assert resolve_ckpt_path("auto", tmp_path / "nothing_here") is None  # a first start
    assert resolve_ckpt_path("some/file.ckpt", tmp_path) == "some/file.ckpt"
    with pytest.warns(UserWarning):
        assert resolve_ckpt_path(f"auto:{tmp_path}", "unused") == str(ckpts / "step_00000003.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=auto:/no/such/run: no such folder"):
        resolve_ckpt_path("auto:/no/such/run", tmp_path)


def test_a_kill_during_a_save_never_leaves_a_truncated_checkpoint(tmp_path):
    """A process rewriting an 8 MB checkpoint in a loop is SIGKILLed while a write is in progress."""
    path = tmp_path / "last.ckpt"
    script = (
        "import torch\n"
        "from codeformer_lightning.training import atomic_torch_save\n"
        "x, i = torch.randn(2**21), 0\n"
        "while True:\n"
        "    state = {'state_dict': {}, 'loops': {}, 'optimizer_states': [], 'global_step': i, 'x': x}\n"
        f"    atomic_torch_save(state, {str(path)!r})\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    deadline = time.monotonic() + 120
    try:
        # wait until a first version exists and the next write is under way
        while not (path.exists() and list(tmp_path.glob(".last.ckpt.*.tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer stopped or never started"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert checkpoint_problem(path) is None  # the previous complete version
    assert torch.load(path, weights_only=True)["x"].numel() == 2**21
    assert find_resume_checkpoint(tmp_path) == path  # the interrupted temporary file is ignored

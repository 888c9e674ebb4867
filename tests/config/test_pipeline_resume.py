"""Resuming a killed pipeline: ``codeformer-train experiment=quickstart`` (stages I -> II -> III and the
evaluation) killed with SIGKILL during stage II, restarted with ``ckpt_path=auto`` in the same run
folder. Stage I is not trained again (its ``stage_complete.json`` and export are reused), stage II
continues from its newest checkpoint, stage III trains; the exports and the evaluation's table equal
those of an uninterrupted run. Plus the errors: a finished stage composed with other overrides, and a
pipeline ``ckpt_path`` that is a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from codeformer_lightning.pipeline import STAGE_DONE
from codeformer_lightning.quickstart import cached_face_folder

STEPS, EVERY = 12, 3
TOLERANCE = 1e-6
EXPORTS = {
    "vqgan": "vqgan/weights/quickstart_vqgan.safetensors",
    "code_predictor": "code_predictor/weights/quickstart_code_predictor.safetensors",
    "cft": "cft/weights/quickstart_cft.safetensors",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cached_face_folder(root / "quickstart_faces", size=32)  # where data=sample_faces looks for it
    return root


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")


def _command(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "codeformer_lightning.commands.train", "experiment=quickstart",
        f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={EVERY}", f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        return subprocess.run(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=900)


def _kill_during_stage_ii(cmd: list[str], run_dir: Path, log: Path) -> None:
    """Start ``cmd``; SIGKILL it as soon as stage II has written its first checkpoint."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while not (run_dir / "code_predictor" / "checkpoints" / "last.ckpt").exists():  # polling: training
            assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no stage II checkpoint after 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _max_diff(a: Path, b: Path) -> float:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first if first[k].numel())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run_dir.parent / "log.txt"
    proc = _run(_command(run_dir, data_dir), log)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run_dir


def test_a_killed_pipeline_resumes_to_the_uninterrupted_result(tmp_path, data_dir, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    _kill_during_stage_ii(_command(run_dir, data_dir), run_dir, log)
    assert (run_dir / "vqgan" / STAGE_DONE).is_file()
    assert not (run_dir / "code_predictor" / STAGE_DONE).exists(), "the kill came after stage II finished"
    assert not (run_dir / EXPORTS["cft"]).exists()

    stage_one = (run_dir / EXPORTS["vqgan"]).stat().st_mtime_ns
    resumed_log = tmp_path / "resumed.txt"
    proc = _run(_command(run_dir, data_dir, "ckpt_path=auto"), resumed_log)
    text = resumed_log.read_text()
    assert proc.returncode == 0, text[-4000:]

    assert "stage vqgan finished before" in text
    assert (run_dir / EXPORTS["vqgan"]).stat().st_mtime_ns == stage_one, "stage I was trained again"
    assert "ckpt_path=auto: resuming from" in text and "code_predictor/checkpoints" in text
    for stage, export in EXPORTS.items():
        assert _max_diff(uninterrupted / export, run_dir / export) <= TOLERANCE, stage
        assert (run_dir / stage / STAGE_DONE).is_file()
    assert (run_dir / "metrics.csv").read_text() == (uninterrupted / "metrics.csv").read_text()
    record = json.loads((run_dir / "code_predictor" / STAGE_DONE).read_text())
    assert record["step"] == STEPS and Path(record["export"]) == run_dir / EXPORTS["code_predictor"]


def test_resuming_a_finished_run_trains_nothing_and_evaluates_again(tmp_path, data_dir, uninterrupted):
    log = tmp_path / "log.txt"
    exports = {stage: (uninterrupted / p).stat().st_mtime_ns for stage, p in EXPORTS.items()}
    proc = _run(_command(uninterrupted, data_dir, "ckpt_path=auto"), log)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert all(f"stage {stage} finished before" in text for stage in EXPORTS)
    assert {stage: (uninterrupted / p).stat().st_mtime_ns for stage, p in EXPORTS.items()} == exports
    assert "Final metrics" in text


def test_a_finished_stage_with_other_overrides_is_an_error(tmp_path, data_dir, uninterrupted):
    log = tmp_path / "log.txt"
    proc = _run(_command(uninterrupted, data_dir, "ckpt_path=auto", "model.optimizer.lr=0.5"), log)
    text = log.read_text()
    assert proc.returncode == 2, text[-4000:]
    assert "finished in" in text and "model.optimizer.lr=0.5" in text and "Fix:" in text


def test_a_pipeline_checkpoint_file_is_an_error(tmp_path, data_dir):
    log = tmp_path / "log.txt"
    proc = _run(_command(tmp_path / "run", data_dir, "ckpt_path=/some/stage.ckpt"), log)
    text = log.read_text()
    assert proc.returncode == 2, text[-4000:]
    assert "ckpt_path=auto" in text and "pipeline.stages.<name>.overrides" in text
    assert not (tmp_path / "run" / "vqgan").exists()

"""Resuming a killed pipeline: ``codeformer-train experiment=quickstart`` (stages I -> II -> III and the
evaluation) killed with SIGKILL during stage II, restarted with ``ckpt_path=auto`` in the same run
folder. Stage I is not trained again (its ``stage_complete.json`` and export are reused), stage II
continues from its newest checkpoint, stage III trains; the exports and the evaluation's table equal
those of an uninterrupted run. Plus the errors: a finished stage composed with other overrides, and a
pipeline ``ckpt_path`` that is a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_resume import TOLERANCE, _env, max_abs_diff, run, run_and_kill

from codeformer_lightning.pipeline import STAGE_DONE

STEPS, EVERY = 12, 3
EXPORTS = {
    "vqgan": "vqgan/weights/quickstart_vqgan.safetensors",
    "code_predictor": "code_predictor/weights/quickstart_code_predictor.safetensors",
    "cft": "cft/weights/quickstart_cft.safetensors",
}


def _command(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "codeformer_lightning.commands.train", "experiment=quickstart",
        f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={EVERY}", f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
        "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip


def _refused(cmd: list[str], log: Path) -> str:
    """Run a command that must stop on a config problem (status 2); its output."""
    with open(log, "a") as out:
        proc = subprocess.run(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 2, text[-4000:]
    return text


def _max_diff(a: Path, b: Path) -> float:
    return max_abs_diff(load_file(a), load_file(b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(_command(run_dir, data_dir), run_dir.parent / "log.txt")
    return run_dir


def test_a_killed_pipeline_resumes_to_the_uninterrupted_result(tmp_path, data_dir, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    run_and_kill(_command(run_dir, data_dir), log, run_dir / "code_predictor" / "checkpoints" / "last.ckpt")
    assert (run_dir / "vqgan" / STAGE_DONE).is_file()
    assert not (run_dir / "code_predictor" / STAGE_DONE).exists(), "the kill came after stage II finished"
    assert not (run_dir / EXPORTS["cft"]).exists()

    stage_one = (run_dir / EXPORTS["vqgan"]).stat().st_mtime_ns
    text = run(_command(run_dir, data_dir, "ckpt_path=auto"), tmp_path / "resumed.txt")

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
    exports = {stage: (uninterrupted / p).stat().st_mtime_ns for stage, p in EXPORTS.items()}
    text = run(_command(uninterrupted, data_dir, "ckpt_path=auto"), tmp_path / "log.txt")
    assert all(f"stage {stage} finished before" in text for stage in EXPORTS)
    assert {stage: (uninterrupted / p).stat().st_mtime_ns for stage, p in EXPORTS.items()} == exports
    assert "Final metrics" in text


def test_a_finished_stage_with_other_overrides_is_an_error(tmp_path, data_dir, uninterrupted):
    text = _refused(_command(uninterrupted, data_dir, "ckpt_path=auto", "model.optimizer.lr=0.5"), tmp_path / "log.txt")
    assert "finished in" in text and "model.optimizer.lr=0.5" in text and "Fix:" in text


def test_a_pipeline_checkpoint_file_is_an_error(tmp_path, data_dir):
    text = _refused(_command(tmp_path / "run", data_dir, "ckpt_path=/some/stage.ckpt"), tmp_path / "log.txt")
    assert "ckpt_path=auto" in text and "pipeline.stages.<name>.overrides" in text
    assert not (tmp_path / "run" / "vqgan").exists()

"""The training command end to end: 2-process CPU DDP, resume, Optuna sweep (the quickstart pipeline:
test_quickstart_run.py; config checks: test_config_checks.py).

Each test runs ``python -m codeformer_lightning.commands.train`` (what ``codeformer-train`` calls) in a
subprocess with a temporary working folder, tiny models, a few steps and the quickstart faces.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from command_helpers import data_dir_of
from omegaconf import OmegaConf

from codeformer_lightning import load_pretrained
from codeformer_lightning.nn import CodeFormer

TRAIN = "codeformer_lightning.commands.train"
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("*.yaml"))


def _only_run(folder: Path) -> Path:
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {folder}, found {runs}"
    return runs[0]


def _quick(*extra: str, data_root: Path) -> list[str]:
    """Overrides shared by the command tests: the session's face folder, no progress bar, few steps."""
    return [f"paths.data_dir={data_dir_of(data_root)}",
            "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", *extra]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates_its_sizes(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation resolves
    assert cfg.model._target_.startswith("codeformer_lightning.models.")
    assert cfg.data._target_ == "codeformer_lightning.data.FaceDataModule"
    if "pipeline" not in cfg or not cfg.pipeline:
        assert int(cfg.data.image_size) == int(cfg.model.net.img_size)


def test_ddp_two_cpu_processes_end_with_identical_weights(run_command, face_folder, tmp_path):
    """Stage I then stage II with 2 gloo processes: both ranks agree and the run saved loadable files."""
    common = ["trainer=ddp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "callbacks.model_checkpoint.every_n_train_steps=3",
              "+callbacks.rank_weights._target_=rank_weights.SaveRankWeights"]
    run_command(TRAIN, "experiment=quickstart_vqgan", *common, f"+callbacks.rank_weights.out_dir={tmp_path / 'vq'}",
                *_quick(data_root=face_folder), timeout=400)
    vq_run = _only_run(tmp_path / "outputs" / "quickstart_vqgan")
    vq_weights = vq_run / "weights" / "quickstart_vqgan.safetensors"
    run_command(TRAIN, "experiment=quickstart_code_predictor", f"model.autoencoder={vq_weights}", *common,
                f"+callbacks.rank_weights.out_dir={tmp_path / 'cp'}", *_quick(data_root=face_folder), timeout=400)
    cp_run = _only_run(tmp_path / "outputs" / "quickstart_code_predictor")
    for ranks, run in ((tmp_path / "vq", vq_run), (tmp_path / "cp", cp_run)):
        r0 = torch.load(ranks / "rank0.pt", weights_only=True)
        r1 = torch.load(ranks / "rank1.pt", weights_only=True)
        assert r0["global_step"] == r1["global_step"] == 3
        assert r0["state"].keys() == r1["state"].keys()
        different = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
        assert not different, f"ranks disagree on {different[:5]}"
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 3
        stale = [k for k, v in ckpt["state_dict"].items() if k in r0["state"] and not torch.equal(v, r0["state"][k])]
        assert not stale, f"last.ckpt differs from the final weights in {stale[:5]}"
    assert type(load_pretrained(cp_run / "weights" / "quickstart_code_predictor.safetensors")) is CodeFormer


def test_resume_continues_the_step_count(run_command, face_folder, tmp_path):
    args = ["experiment=quickstart_vqgan", "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
            "model.disc_start_step=1", "logger=csv", *_quick(data_root=face_folder)]
    run_command(TRAIN, *args, "trainer.max_steps=4")
    first = _only_run(tmp_path / "outputs" / "quickstart_vqgan")
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    run_command(TRAIN, *args, "trainer.max_steps=6", f"ckpt_path={last}", "task_name=resumed")
    resumed = _only_run(tmp_path / "outputs" / "resumed")
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # 4 restored + 2 more, not 6 from scratch
    steps = [int(r["step"]) for r in csv.DictReader(next(resumed.rglob("metrics.csv")).open()) if r.get("step")]
    assert steps and min(steps) >= 4


def test_optuna_sweep_runs_its_trials_and_reports_the_best(run_command, face_folder, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_command(TRAIN, "-m", "hparams_search=vqgan_optuna", "experiment=quickstart_vqgan", "trainer.max_steps=2",
                "trainer.val_check_interval=2", "hydra.sweeper.n_trials=2",
                *_quick(data_root=face_folder), timeout=400)
    sweep = _only_run(tmp_path / "outputs" / "quickstart_vqgan" / "multirun")
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 2 and all((t / "config.yaml").is_file() for t in trials)
    lrs = {yaml.safe_load((t / "config.yaml").read_text())["model"]["optimizer"]["lr"] for t in trials}
    assert len(lrs) == 2  # the sweeper chose different values
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "best_params" in best and "best_value" in best

"""The training command end to end: quickstart pipeline, 2-process CPU DDP, resume, Optuna sweep, config checks.

Each test runs ``python -m codeformer_lightning.commands.train`` (what ``codeformer-train`` calls) in a
subprocess with a temporary working folder, tiny models, a few steps and the quickstart faces.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from codeformer_lightning import load_pretrained
from codeformer_lightning.config_checks import ConfigError, check_config
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder

TRAIN = "codeformer_lightning.commands.train"
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("*.yaml"))


def _only_run(folder: Path) -> Path:
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {folder}, found {runs}"
    return runs[0]


def _quick(*extra: str, data_root: Path) -> list[str]:
    """Overrides shared by the command tests: the session's face folder, no progress bar, few steps."""
    return [f"paths.data_dir={data_root.parent}",
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


def test_config_checks_list_every_problem_with_its_fix(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=code_predictor", "data.train_dir=/no/such/faces", "trainer=ddp_cpu",
                      "trainer.devices=1", "data.image_size=256")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    text = str(err.value)
    assert "data.train_dir=/no/such/faces: no such file or folder" in text
    assert "model.autoencoder is not set" in text and "codeformer-pipeline" in text
    assert "256" in text and "512" in text  # data and network sizes disagree


def test_quickstart_pipeline_runs_offline_and_writes_checkpoints_grid_and_metrics(run_command, face_folder, tmp_path):
    # every stage for 6 steps, validation and checkpoints every 3: the full path of the README's main job
    run_command(TRAIN, "experiment=quickstart", "trainer.max_steps=6", "trainer.val_check_interval=3",
                "callbacks.model_checkpoint.every_n_train_steps=3", *_quick(data_root=face_folder),
                WANDB_MODE="disabled")
    run = _only_run(tmp_path / "outputs" / "quickstart")
    for stage, net_class in (("vqgan", VQAutoEncoder), ("code_predictor", CodeFormer), ("cft", CodeFormer)):
        assert (run / stage / "checkpoints" / "last.ckpt").is_file(), stage
        weights = run / stage / "weights" / f"quickstart_{stage}.safetensors"
        assert type(load_pretrained(weights)) is net_class
        assert (run / stage / "config.yaml").is_file()
    cfg = yaml.safe_load((run / "cft" / "config.yaml").read_text())
    assert cfg["model"]["init_from"].endswith("code_predictor.safetensors")  # stages hand over by path
    # stage III starts its discriminator from stage I's export, as the published recipe
    assert cfg["model"]["discriminator_from"].endswith("vqgan/weights/quickstart_vqgan_discriminator.safetensors")
    assert (run / "grid.png").stat().st_size > 1000
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["restoration"] for r in rows] == ["input", "w0", "w0.5", "w1"]
    assert all(float(r["psnr_db"]) > 5 for r in rows)


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

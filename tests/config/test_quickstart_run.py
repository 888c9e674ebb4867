"""The README's main job, run once (``quickstart_run``: ``codeformer-train experiment=quickstart`` at 6 steps
per stage) and inspected as a new user would: the files it writes, the summary it ends with, its log,
one step numbering across metrics, images and checkpoints, and its checkpoints turned back into models.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from codeformer_lightning import load_pretrained
from codeformer_lightning.checkpoints import LIGHTNING_KEY
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.models.cft import CFTModule
from codeformer_lightning.models.code_predictor import CodePredictorModule
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder

STAGES = {"vqgan": (VQAutoEncoder, VQGANModule), "code_predictor": (CodeFormer, CodePredictorModule),
          "cft": (CodeFormer, CFTModule)}
#: Lightning and torch messages that say nothing about this run (codeformer_lightning/training/quiet.py)
NOISE = ("Epoch ", "module(s) in eval mode", "Tip:", "ModelCheckpoint with manual optimization", "LeafSpec",
         "smaller than the logging interval", "TPU available")
#: the log of the 6-step quickstart: 3 x (a pipeline line, seed, data, model, GPU line, 20-line model
#: summary, 2 step lines, 2 validation lines, "max_steps reached") + the closing summary (about 30 lines)
MAX_LOG_LINES = 130


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quickstart_writes_checkpoints_weights_grid_and_metrics(quickstart_run):
    run = quickstart_run.folder
    for stage, (net_class, _) in STAGES.items():
        assert (run / stage / "checkpoints" / "last.ckpt").is_file(), stage
        weights = run / stage / "weights" / f"quickstart_{stage}.safetensors"
        assert type(load_pretrained(weights)) is net_class
        assert (run / stage / "config.yaml").is_file()
    cfg = yaml.safe_load((run / "cft" / "config.yaml").read_text())
    assert cfg["model"]["init_from"].endswith("code_predictor.safetensors")  # stages hand over by path
    # stage III starts its discriminator from stage I's export, as the published recipe
    assert cfg["model"]["discriminator_from"].endswith("vqgan/weights/quickstart_vqgan_discriminator.safetensors")
    assert (run / "grid.png").stat().st_size > 1000
    rows = _rows(run / "metrics.csv")
    assert [r["restoration"] for r in rows] == ["input", "w0", "w0.5", "w1"]
    assert all(float(r["psnr_db"]) > 5 for r in rows)


def test_the_run_ends_with_where_its_files_are_and_the_final_metrics(quickstart_run):
    run, out = quickstart_run.folder, quickstart_run.stdout
    assert "Finished the pipeline (vqgan, code_predictor, cft)" in out
    summary = out[out.index("Finished the pipeline") :]
    assert f"{run.name}/ (grid.png, metrics.csv, metrics.md)" in summary
    for stage in STAGES:
        assert f"{run.name}/{stage}/weights/quickstart_{stage}.safetensors" in summary
        assert f"{run.name}/{stage}/checkpoints/ (last.ckpt: resume with ckpt_path=<this file>" in summary
        assert f"{run.name}/{stage}/csv/metrics.csv" in summary
    assert "quickstart_vqgan.safetensors (+ quickstart_vqgan_discriminator.safetensors)" in summary
    # the final table holds the numbers of metrics.csv (written with 3 decimals, printed with 4 digits)
    table = {m.group(1): (float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"^\| (input|w[\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", summary, re.M)}
    rows = _rows(run / "metrics.csv")
    assert sorted(table) == sorted(r["restoration"] for r in rows)
    for r in rows:
        psnr, ssim = table[r["restoration"]]
        assert psnr == pytest.approx(float(r["psnr_db"]), abs=0.01) and ssim == pytest.approx(float(r["ssim"]), abs=1e-3)
    assert summary.rstrip().endswith(f"| w1 | {table['w1'][0]:.4g} | {table['w1'][1]:.4g} |")


def test_the_log_shows_step_progress_and_none_of_the_known_noise(quickstart_run):
    log = quickstart_run.log
    for noise in NOISE:
        assert noise not in log, noise
    assert log.count("step 3/6 (elapsed") == 3 and log.count("step 6/6 (elapsed") == 3  # one bar per stage
    assert log.count("validation at step 3: val/") == 3 and log.count("validation at step 6: val/") == 3
    assert len(log.splitlines()) <= MAX_LOG_LINES, log


def test_metrics_images_and_checkpoints_share_one_step_numbering(quickstart_run):
    for stage in STAGES:
        folder = quickstart_run.folder / stage
        rows = _rows(folder / "csv" / "metrics.csv")
        val_steps = sorted({int(r["step"]) for r in rows if any(r[k] for k in r if k.startswith("val/"))})
        train_steps = {int(r["step"]) for r in rows if any(r[k] for k in r if k.startswith("train/"))}
        assert val_steps == [3, 6], stage  # not 2 and 5: the steps completed, as everywhere else
        assert train_steps == {3, 6}, stage  # logged every 3 steps: the 3rd and the 6th
        images = sorted(p.name for p in (folder / "csv" / "images").glob("val_samples_step*.png"))
        assert images == ["val_samples_step0000003.png", "val_samples_step0000006.png"], stage
        periodic = sorted((folder / "checkpoints").glob("step_*.ckpt"))
        assert [p.name for p in periodic] == ["step_00000003.ckpt", "step_00000006.ckpt"], stage
        for path in [*periodic, *(folder / "checkpoints").glob("best_step*.ckpt")]:
            number = int(re.search(r"step_?(\d+)", path.name).group(1))
            assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == number, path


def test_a_training_checkpoint_becomes_the_trained_network_and_the_module(quickstart_run):
    for stage, (net_class, module_class) in STAGES.items():
        folder = quickstart_run.folder / stage
        ckpt_path = folder / "checkpoints" / "last.ckpt"
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain types only
        assert ckpt[LIGHTNING_KEY]["networks"]["net"]["class"] == net_class.__name__
        exported = load_pretrained(folder / "weights" / f"quickstart_{stage}.safetensors")
        network = load_pretrained(ckpt_path)
        assert type(network) is net_class and not network.training
        assert _state_equal(network.state_dict(), exported.state_dict()), stage  # the EMA weights it exported
        module = module_class.load_from_checkpoint(ckpt_path)  # no networks passed
        assert _state_equal(module.state_dict(), ckpt["state_dict"]), stage
        assert dict(module.hparams) == ckpt["hyper_parameters"], stage  # still names the files it started from


def test_codeformer_convert_turns_a_checkpoint_into_weights(quickstart_run, tmp_path):
    folder = quickstart_run.folder / "cft"
    out = tmp_path / "cft.safetensors"
    convert = Path(sys.executable).with_name("codeformer-convert")
    done = subprocess.run([str(convert), str(folder / "checkpoints" / "last.ckpt"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    exported = load_pretrained(folder / "weights" / "quickstart_cft.safetensors")
    assert _state_equal(load_pretrained(out).state_dict(), exported.state_dict())

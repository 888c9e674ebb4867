"""Running a composed config from Python, outside ``@hydra.main``, from a folder outside the repository
(the editable install): ``compose_config`` + ``run``, and Hydra's own ``compose`` + ``train.train``
with the default run folder and ``instantiate_group`` for callbacks and loggers. The same from an
installed wheel: tests/packaging/test_python_api_wheel.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from command_helpers import command_env, data_dir_of

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from pathlib import Path

from hydra import compose, initialize_config_module

import codeformer_lightning
from codeformer_lightning import compose_config, load_pretrained, run
from codeformer_lightning.train import instantiate_group, train

quick = ["trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.data_dir={sys.argv[1]}",
         "trainer.enable_model_summary=false"]
report = {"package": codeformer_lightning.__file__}

# 1. compose_config + run into a folder of one's own; the callbacks and loggers as objects
cfg = compose_config("experiment=quickstart_vqgan", *quick, output_dir="my_runs/first")
report["callbacks"] = sorted(type(c).__name__ for c in instantiate_group(cfg.callbacks))
report["loggers"] = [type(lg).__name__ for lg in instantiate_group(cfg.logger)]
result = run(cfg)
report["first"] = {"folder": str(result.output_dir), "step": result.step, "metrics": sorted(result.metrics),
                   "last": str(result.last_checkpoint), "network": type(load_pretrained(result.last_checkpoint)).__name__}

# 2. Hydra's compose + train(): no Hydra runtime, so the run folder is outputs/<task_name>/<timestamp>
with initialize_config_module("codeformer_lightning.conf", version_base="1.3"):
    cfg = compose("train", overrides=["experiment=quickstart_vqgan", *quick, "task_name=plain"])
stage = train(cfg)
report["second"] = {"folder": str(stage.output_dir), "weights": [str(p) for p in stage.weights]}
print("REPORT " + json.dumps(report))
"""


def _report(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("REPORT "))[7:])


def test_compose_and_run_from_python_outside_the_repository(face_folder, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(data_dir_of(face_folder))], cwd=tmp_path, env=command_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = _report(done.stdout)
    assert Path(report["package"]).is_relative_to(REPO)  # the editable install, run from elsewhere
    first = report["first"]
    assert Path(first["folder"]) == Path("my_runs/first") and (tmp_path / "my_runs/first/checkpoints/last.ckpt").is_file()
    assert first["step"] == 2 and "val/psnr" in first["metrics"] and first["network"] == "VQAutoEncoder"
    assert "Finished quickstart_vqgan: 2 steps in my_runs/first" in done.stdout  # the summary is printed
    second = tmp_path / report["second"]["folder"]  # relative to where the script ran (paths.root_dir=.)
    assert second.parent == tmp_path / "outputs" / "plain" and (second / "config.yaml").is_file()
    assert [Path(p).name for p in report["second"]["weights"]][0] == "plain.safetensors"
    assert {"ModelCheckpoint", "StepProgressBar", "ExportWeights"} <= set(report["callbacks"])
    assert report["loggers"] == ["CSVLogger"]

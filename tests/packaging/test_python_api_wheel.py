"""From an installed wheel (a fresh venv, not the repository), offline: the README's "From Python" path,
``compose_config`` + ``run``, trains the quickstart's three stages into a folder of the user's, passes
the overrides on to every stage, prints the summary, and its checkpoints load back as networks
(slow: installs the wheel's dependencies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json
import codeformer_lightning
from codeformer_lightning import compose_config, load_pretrained, run

cfg = compose_config("experiment=quickstart", "trainer.max_steps=1", "trainer.val_check_interval=1",
                     "trainer.enable_model_summary=false", output_dir="runs/quickstart")
result = run(cfg)
print("REPORT " + json.dumps({
    "package": codeformer_lightning.__file__,
    "stages": {name: {"step": stage.step, "network": type(load_pretrained(stage.last_checkpoint)).__name__}
               for name, stage in result.stages.items()},
    "evaluation": sorted(result.evaluation),
}))
"""


def test_compose_config_and_run_from_the_installed_wheel(installed_wheel):
    done = installed_wheel.run("python", "-c", SCRIPT, timeout=1800)
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert Path(report["package"]).is_relative_to(installed_wheel.venv)
    assert report["stages"] == {
        "vqgan": {"step": 1, "network": "VQAutoEncoder"},  # max_steps=1 reached every stage
        "code_predictor": {"step": 1, "network": "CodeFormer"},
        "cft": {"step": 1, "network": "CodeFormer"},
    }
    assert "eval/psnr_w0.5" in report["evaluation"]
    run = installed_wheel.workdir / "runs" / "quickstart"
    assert (run / "grid.png").is_file() and (run / "cft" / "weights" / "quickstart_cft.safetensors").is_file()
    assert "Finished the pipeline (vqgan, code_predictor, cft) in runs/quickstart" in done.stdout
    assert installed_wheel.network_attempts() == ""

"""Config checks: one pass lists every problem, each with an override that exists and fixes it, in the
terms of the stage being trained; the commands print the list without a traceback and exit with 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import open_dict

from codeformer_lightning.config_checks import ConfigError, check_config, find_problems

#: (experiment, overrides) that break many things at once; each experiment's problems are listed
BROKEN = {
    "vqgan": ["data.train_dir=/no/such/faces", "trainer=ddp_cpu", "trainer.devices=1", "data.image_size=256"],
    "code_predictor": ["data.train_dir=/no/such/faces", "trainer.max_steps=-1", "trainer.max_epochs=-1"],
    "cft": ["model.init_from=/no/such/stage2.safetensors", "ckpt_path=/no/such.ckpt"],
}


@pytest.fixture(autouse=True)
def _no_vgg_in_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # LPIPS' VGG16 file is nowhere
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # the published experiments log to W&B


def _fixes(problem: str) -> list[list[str]]:
    """The alternatives a problem offers, each a list of overrides (``Fix: `a=1 b=2`, or `c=3```)."""
    assert "Fix: " in problem, problem
    return [alternative.split() for alternative in re.findall(r"`([^`]+=[^`]*)`", problem.split("Fix: ", 1)[1])]


def _real_file(tmp_path: Path, value: str) -> str:
    """A placeholder ``/path/to/x`` of a fix as an existing file or folder."""
    if not value.startswith("/path/to/"):
        return value
    path = tmp_path / "files" / value.removeprefix("/path/to/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if "." in path.name:
        path.touch()
    else:
        path.mkdir(exist_ok=True)
    return str(path)


@pytest.mark.parametrize("experiment", sorted(BROKEN))
def test_every_problem_names_an_override_that_exists_and_fixes_it(compose_cfg, tmp_path, experiment):
    overrides = [f"experiment={experiment}", *BROKEN[experiment]]
    problems = find_problems(compose_cfg(*overrides))
    assert len(problems) >= 4, problems
    for problem in problems:
        alternatives = _fixes(problem)
        assert alternatives, problem
        for fix in alternatives:
            resolved = []
            for override in fix:
                key, value = override.split("=", 1)
                resolved.append(f"{key}={_real_file(tmp_path, value)}")
            try:
                fixed = compose_cfg(*overrides, *resolved)  # raises if a key does not exist
            except HydraException as exc:
                pytest.fail(f"the fix {fix} of {problem!r} does not compose: {exc}")
            with open_dict(fixed):
                fixed.paths.output_dir = str(tmp_path / "run")
            assert problem not in find_problems(fixed), f"{fix} does not fix {problem!r}"


def test_one_pass_lists_everything_including_the_missing_vgg_file(compose_cfg):
    cfg = compose_cfg("experiment=vqgan", "data.train_dir=/no/such/faces", "trainer=ddp_cpu", "trainer.devices=1",
                      "data.image_size=256")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    text = str(err.value)
    assert text.startswith("The configuration cannot run (5 problems):")
    assert "data.train_dir=/no/such/faces: no such file or folder" in text
    assert "model.loss.perceptual_weight=1.0 needs torchvision's VGG16" in text  # reported now, not at build time
    assert "`model.loss.perceptual_weights_path=/path/to/vgg16-397923af.pth`" in text
    assert "data.image_size=256 but model.net.img_size=512" in text
    assert "trainer.devices=1" in text and "logger.wandb" in text
    assert err.value.problems == find_problems(cfg)


def test_each_stage_is_told_what_it_needs(compose_cfg):
    stage2 = "\n".join(find_problems(compose_cfg("experiment=code_predictor")))
    assert "stage II trains on the codes of a frozen stage I autoencoder" in stage2
    stage3 = "\n".join(find_problems(compose_cfg("experiment=cft")))
    assert not re.search(r"stage II\b", stage3)  # stage III is not told about stage II's needs
    assert "stage III computes its target codes with the frozen stage I autoencoder" in stage3
    assert "model.discriminator_from is not set" in stage3 and "`model.discriminator_from=random`" in stage3
    assert "model.perceptual_weight=1.0 needs torchvision's VGG16" in stage3
    stage1 = "\n".join(find_problems(compose_cfg("experiment=vqgan")))
    assert "autoencoder" not in stage1 and "discriminator_from" not in stage1
    # a latent-code file and CodeFormer weights replace the autoencoder
    ok = find_problems(compose_cfg("experiment=code_predictor", f"data.latent_codes={__file__}", f"model.init_from={__file__}"))
    assert not [p for p in ok if "model.autoencoder" in p]


@pytest.mark.parametrize(("command", "overrides"), [
    ("codeformer-train", ["experiment=cft"]),
    ("codeformer-pipeline", ["data.train_dir=/no/such/faces"]),
])
def test_the_commands_print_the_problems_and_exit_2_without_a_traceback(tmp_path, command, overrides):
    env = {"PATH": str(Path(sys.executable).parent), "TORCH_HOME": str(tmp_path / "torch_home"), "HOME": str(tmp_path),
           "WANDB_MODE": "online"}
    done = subprocess.run([str(Path(sys.executable).with_name(command)), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "Error executing job" not in output
    assert done.stderr.startswith("error: The configuration cannot run (")
    if command == "codeformer-pipeline":
        # every stage is checked before the first one trains: stage III's problems come before stage I runs
        assert "stage vqgan: data.train_dir=/no/such/faces" in output
        assert "stage cft: model.loss" not in output and "stage cft: model.perceptual_weight=1.0" in output
        assert "stage code_predictor: model.autoencoder" not in output  # stage I's export will be there
        assert not list(tmp_path.glob("outputs/pipeline/*/vqgan"))

"""``codeformer-train --help`` and ``codeformer-pipeline --help``: a description, the config groups with
their options and examples (conf/hydra/help/), not Hydra's generic text and the whole composed config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("command", ["codeformer-train", "codeformer-pipeline"])
def test_help_describes_the_command_its_groups_and_examples(command, tmp_path):
    done = subprocess.run([str(Path(sys.executable).with_name(command)), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"{command}: train ")
    assert "powered by Hydra" not in text and "_target_" not in text  # no generic header, no config dump
    assert "== Examples ==" in text and f"  {command} " in text.split("== Examples ==")[1]
    groups = dict(line.split(": ", 1) for line in text.split("== Config groups (group=option) ==")[1].splitlines()
                  if ": " in line and not line.startswith(" "))
    experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert groups["experiment"].split(", ") == experiments
    assert groups["trainer"].split(", ") == sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
    assert f"{command} --hydra-help" in text and "--cfg job" in text
    assert len(text.splitlines()) < 70

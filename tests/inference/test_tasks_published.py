"""Published-layout colorization and inpainting weights (random values, the published tensor names
and shapes) through ``codeformer-restore --aligned`` with no extra flag, against the published
scripts written out in :mod:`task_reference` around the published-style network of
``tests/reference_impl.py`` (loaded from the same tensors, without our key conversion).

A 512 px forward takes 10-30 s on a loaded 2-core machine: one image runs by default, the rest of
the shared faces are ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import shared_folder
from published_files import KEYS_FILE, random_published_state
from reference_impl import RefCodeFormer
from task_reference import first_output, published_colorization, published_inpainting

from codeformer_lightning.inference.cli import main
from codeformer_lightning.inference.tasks import white_mask
from codeformer_lightning.io import read_image

pytestmark = pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"{KEYS_FILE} (published key list) not found")
KINDS = {"inpainting": "codeformer_inpainting", "colorization": "codeformer_colorization"}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """``get(task)`` -> (weight file in the published layout, the published-style network on it)."""
    folder = tmp_path_factory.mktemp("published")
    made: dict[str, tuple] = {}

    def get(task: str):
        if task not in made:
            state = random_published_state(KINDS[task])
            path = folder / f"{KINDS[task]}.pth"
            torch.save({"params_ema": state}, path)
            codes = state["quantize.embedding.weight"].shape[0]
            reference = RefCodeFormer(codebook_size=codes, connect_list=["32", "64", "128"]).eval()
            reference.load_state_dict(state)
            made[task] = path, first_output(reference)
        return made[task]

    return get


def _restore(tmp_path: Path, weights: Path, inputs: list[Path]) -> Path:
    out = tmp_path / "out"
    assert main([*map(str, inputs), "-o", str(out), "--weights", str(weights), "--aligned"]) == 0
    return out / "final_results"


def _check_inpainting(results, network, files) -> None:
    for file in files:
        face = read_image(file)
        mask = white_mask(face)
        assert 0.05 < mask.mean() < 0.95, file
        got = read_image(results / f"{file.stem}.png")
        np.testing.assert_array_equal(got[~mask], face[~mask])  # unmasked pixels unchanged, to the bit
        expected = published_inpainting(network, face)
        assert np.abs(got.astype(int) - expected).max() <= 1, file  # the filled pixels: within rounding


def test_inpainting_weights_restore_a_shared_masked_face_as_the_published_script(tmp_path, published):
    files = sorted(shared_folder("masked").glob("*.png"))[-1:]
    weights, network = published("inpainting")
    _check_inpainting(_restore(tmp_path, weights, files), network, files)


@pytest.mark.slow
def test_inpainting_weights_restore_every_shared_masked_face_as_the_published_script(tmp_path, published):
    files = sorted(shared_folder("masked").glob("*.png"))
    weights, network = published("inpainting")
    _check_inpainting(_restore(tmp_path, weights, [shared_folder("masked")]), network, files)


@pytest.mark.slow
def test_colorization_weights_colourise_the_shared_grey_faces_as_the_published_script(tmp_path, published):
    folder = shared_folder("gray")
    weights, network = published("colorization")
    results = _restore(tmp_path, weights, [folder])
    for file in sorted(folder.glob("*.png")):
        face = read_image(file)
        got = read_image(results / f"{file.stem}.png")
        expected = published_colorization(network, face)
        assert np.abs(got.astype(int) - expected).max() <= 1, file

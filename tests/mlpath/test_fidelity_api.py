"""Issue 13, item 9: one set of inference defaults, and ``w`` in any form everywhere (nn, FaceRestorer,
``codeformer-restore``), with clear errors, and ``w > 1`` allowed with a warning as published."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from codeformer_lightning import FaceRestorer, save_weights
from codeformer_lightning.data.gpu_degradations import degrade_batch
from codeformer_lightning.nn import DEFAULT_ADAIN, DEFAULT_W, CodeFormer


@pytest.fixture
def model(tiny_cf_config) -> CodeFormer:
    return CodeFormer(**tiny_cf_config).eval()


@pytest.fixture
def faces() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_restore_and_forward_share_the_published_defaults(model, faces):
    # inference_codeformer.py: --fidelity_weight 0.5, adain=True
    assert (DEFAULT_W, DEFAULT_ADAIN) == (0.5, True)
    for method in (CodeFormer.restore, CodeFormer.forward):
        params = inspect.signature(method).parameters
        assert (params["w"].default, params["adain"].default) == (DEFAULT_W, DEFAULT_ADAIN), method.__name__
    with torch.no_grad():
        by_default = model.restore(faces).image.clamp(-1, 1)
        assert torch.equal(by_default, model(faces))
        assert torch.equal(by_default, model.restore(faces, w=0.5, adain=True).image.clamp(-1, 1))
        assert not torch.equal(by_default, model.restore(faces, w=0.0, adain=False).image.clamp(-1, 1))


def test_w_as_float_list_tuple_array_or_tensor_gives_the_same_images(model, faces):
    with torch.no_grad():
        per_image = model(faces, w=torch.tensor([0.0, 1.0]))
        for w in ([0.0, 1.0], (0.0, 1.0), np.array([0.0, 1.0]), np.array([0.0, 1.0], np.float32)):
            assert torch.equal(model(faces, w=w), per_image), type(w)
        # each image of the batch as restored alone with its own float w
        alone = torch.cat([model(faces[:1], w=0.0), model(faces[1:], w=1.0)])
        torch.testing.assert_close(per_image, alone, atol=1e-4, rtol=0)  # batched vs single: float rounding
        one = model(faces, w=0.7)
        for w in ([0.7], (0.7,), np.float64(0.7), np.array([0.7])):
            assert torch.equal(model(faces, w=w), one), type(w)
        assert torch.allclose(model(faces, w=torch.tensor(0.7)), one, atol=1e-5)


@pytest.mark.parametrize(
    ("w", "error", "message"),
    [
        ([0.1, 0.2, 0.3], ValueError, "3 value(s) [0.1, 0.2, 0.3] for a batch of 2 image(s)"),
        (torch.zeros(3), ValueError, "one value or one per image"),
        (np.zeros((2, 2)), ValueError, "flat sequence"),
        ([], ValueError, "0 value(s)"),
        (-0.1, ValueError, "finite and >= 0"),
        ([0.5, float("nan")], ValueError, "finite and >= 0"),
        ("high", TypeError, "w must be a number or a sequence of numbers, got 'high'"),
    ],
)
def test_bad_w_gets_a_clear_error(model, faces, w, error, message):
    with pytest.raises(error) as info:
        model(faces, w=w)
    assert message in str(info.value)


def test_w_above_one_is_allowed_with_a_warning_at_inference_only(model, faces):
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"w=1.3 > 1 extrapolates"):
            above = model(faces, w=1.3)
        assert not torch.equal(above, model(faces, w=1.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # restore(): what training calls with the published w = 1.3
            model.restore(faces, w=torch.tensor(1.3))
            model.restore(faces, w=1.3)


def test_face_restorer_takes_w_in_any_form(model):
    restorer = FaceRestorer(model)
    face = np.asarray(Image.new("RGB", (32, 32), (120, 90, 80)))
    assert restorer.restore(face, w=0.3, aligned=True).ws == pytest.approx([0.3])
    for w in ([0.3, 0.8], (0.3, 0.8), np.array([0.3, 0.8]), torch.tensor([0.3, 0.8])):
        assert restorer.restore(face, w=w, aligned=True).ws == pytest.approx([0.3, 0.8]), type(w)
    with pytest.raises(TypeError, match="number or a sequence of numbers"):
        restorer.restore(face, w="high", aligned=True)


def test_codeformer_restore_accepts_w_above_one_with_a_warning(model, tmp_path):
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    Image.new("RGB", (32, 32), (120, 90, 80)).save(tmp_path / "face.png")
    command = [sys.executable, "-m", "codeformer_lightning.inference.cli", str(tmp_path / "face.png"), "--aligned",
               "-o", str(tmp_path / "out"), "--weights", str(weights)]
    done = subprocess.run([*command, "-w", "1.2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "w=1.2 > 1 extrapolates" in done.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) >= 1
    done = subprocess.run([*command, "-w", "-1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and ">= 0" in done.stderr


def test_degrade_batch_returns_the_tuple_its_docstring_names():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = degrade_batch(x, "stage3_small", torch.Generator().manual_seed(0))
    assert isinstance(out, tuple) and len(out) == 2
    lq, params = out
    assert lq.shape == x.shape and isinstance(params, dict)
    assert "tuple ``(lq, params)``" in degrade_batch.__doc__

"""The variants' published inference in FaceRestorer (tiny networks of our own layout): defaults from
the weights, the inpainting mask and composite, colorization of whole photos, overrides, masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from task_reference import published_colorization, published_inpainting
from test_inference_restorer import FixedDetector

from codeformer_lightning.inference.align import invert_affine
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.inference.tasks import (
    PUBLISHED_TASKS,
    MaskSource,
    TaskError,
    checked_mask,
    task_for,
    white_mask,
    white_mask_tensor,
)
from codeformer_lightning.io import write_image
from codeformer_lightning.nn import CodeFormer

SIZE = 32


def _variant_model(config: dict, variant: str, seed: int = 0) -> CodeFormer:
    """A tiny random CodeFormer marked as ``variant``, with a spread-out codebook (so that w and
    AdaIN visibly change the output)."""
    torch.manual_seed(seed)
    model = CodeFormer(**config).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    model.variant = variant
    return model


def _holed_face(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random aligned face (no pure-white pixel) and white holes painted into it: (face, holes)."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, 250, (SIZE, SIZE, 3), dtype=np.uint8)
    holes = np.zeros((SIZE, SIZE), bool)
    holes[4:14, 6:20] = True
    holes[20:28, 18:30] = True
    face[holes] = 255
    return face, holes


def _calls(model: torch.nn.Module) -> list[tuple]:
    """Records (batch, w, adain) of every network call."""
    calls: list[tuple] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs.get("w"), kwargs.get("adain"))),
        with_kwargs=True,
    )
    return calls


def test_the_published_settings_of_each_task():
    table = {name: (t.w, t.fixed_w, t.adain, t.masked, t.whole_photos) for name, t in PUBLISHED_TASKS.items()}
    assert table == {
        "restoration": (0.5, False, True, False, True),
        "colorization": (0.0, True, True, False, True),
        "inpainting": (1.0, True, False, True, False),
    }
    assert task_for("inpainting").name == "inpainting" and task_for("colorization").name == "colorization"
    assert task_for("custom").name == "restoration" and task_for(None).name == "restoration"
    assert task_for("inpainting", "restoration").name == "restoration"
    with pytest.raises(ValueError, match="task must be one of"):
        task_for("restoration", "deblurring")


def test_the_white_mask_is_all_three_channels_at_255_in_both_forms():
    image = np.full((2, 3, 3), 255, np.uint8)
    image[0, 0, 0] = 254
    image[0, 1, 1] = 0
    image[1, 2] = (255, 255, 254)
    expected = np.array([[False, False, True], [True, True, False]])
    np.testing.assert_array_equal(white_mask(image), expected)
    # the script's rule on its [-1, 1] input: the three channels sum to 3
    x = torch.from_numpy(image / 255.0).float().permute(2, 0, 1)[None].sub(0.5).div(0.5)
    np.testing.assert_array_equal(white_mask_tensor(x)[0, 0].numpy(), expected)


def test_inpainting_weights_fill_only_the_white_pixels_as_published(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "inpainting")
    calls = _calls(model)
    restorer = FaceRestorer(model)
    face, holes = _holed_face()
    result = restorer.restore(face, aligned=True)
    assert result.task == "inpainting" and result.ws == [1.0] and restorer.adain is False
    assert calls == [(1, 1.0, False)]
    out = result.image
    np.testing.assert_array_equal(out[~holes], face[~holes])  # unmasked pixels unchanged, to the bit
    expected = published_inpainting(model, face)
    np.testing.assert_array_equal(expected[~holes], face[~holes])
    assert np.abs(out.astype(int) - expected).max() <= 1  # masked pixels: the script's, within rounding
    # the defaults matter: the restoration settings give other pixels in the holes
    other = FaceRestorer(model, task="restoration").restore(face, aligned=True).image
    assert np.abs(other[holes].astype(int) - expected[holes]).mean() > 5
    assert (other[~holes] != face[~holes]).any()


def test_a_given_mask_is_painted_white_for_the_network_and_only_it_changes(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "inpainting", seed=1)
    face, holes = _holed_face(seed=1)
    painted_over = face.copy()
    painted_over[holes] = np.random.default_rng(2).integers(0, 200, (int(holes.sum()), 3))  # not white
    restorer = FaceRestorer(model)
    out = restorer.restore(painted_over, aligned=True, mask=holes * np.uint8(255)).image
    np.testing.assert_array_equal(out[~holes], painted_over[~holes])
    # the network saw the holes white, as in the published training data
    assert np.abs(out.astype(int) - published_inpainting(model, face)).max() <= 1


def test_masks_of_the_wrong_size_or_without_pixels_are_explained(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "inpainting")
    calls = _calls(model)
    restorer = FaceRestorer(model)
    face, _ = _holed_face()
    with pytest.raises(TaskError, match="16x32 px but the image is 32x32 px"):
        restorer.restore(face, aligned=True, mask=np.ones((32, 16), bool))
    with pytest.raises(TaskError, match="marks no pixel to fill"):
        restorer.restore(face, aligned=True, mask=np.zeros((SIZE, SIZE), np.uint8))
    # no pure-white pixel: the published script returns the input; no network call is needed
    plain = np.random.default_rng(3).integers(0, 250, (SIZE, SIZE, 3), dtype=np.uint8)
    result = restorer.restore(plain, aligned=True)
    np.testing.assert_array_equal(result.image, plain)
    assert calls == [] and any("nothing to inpaint" in n for n in result.notes)
    with pytest.raises(TaskError, match="a mask applies to inpainting only"):
        FaceRestorer(model, task="restoration").restore(face, aligned=True, mask=np.ones((SIZE, SIZE), bool))


def test_inpainting_refuses_whole_photos_and_says_what_to_do(tiny_cf_config):
    restorer = FaceRestorer(_variant_model(tiny_cf_config, "inpainting"), detector=FixedDetector([(40, 40)]))
    with pytest.raises(TaskError, match=r"aligned faces only.*aligned=True"):
        restorer.restore(np.zeros((80, 80, 3), np.uint8))


def test_colorization_weights_run_at_w0_with_adain_as_published(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "colorization")
    calls = _calls(model)
    restorer = FaceRestorer(model)
    grey = np.repeat(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8), 3, axis=2)
    result = restorer.restore(grey, aligned=True)
    assert result.task == "colorization" and result.ws == [0.0] and calls == [(1, 0.0, True)]
    expected = published_colorization(model, grey)
    assert np.abs(result.image.astype(int) - expected).max() <= 1
    assert restorer.task_notes(aligned=True) == []  # the published settings: nothing to say
    # an explicit w is an override, said once by the commands
    note = restorer.task_notes(0.5, aligned=True)
    assert len(note) == 1 and "w=0.5 instead of the published w=0" in note[0]
    assert restorer.restore(grey, w=0.5, aligned=True).ws == [0.5]


def test_colorization_of_a_whole_photo_changes_only_the_faces(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "colorization")
    detector = FixedDetector([(48, 40)], eye_distance=12)
    restorer = FaceRestorer(model, detector=detector)
    photo = np.repeat(np.random.default_rng(5).integers(0, 256, (96, 128, 1), dtype=np.uint8), 3, axis=2)
    result = restorer.restore(photo)
    assert result.ws == [0.0] and len(result.cropped_faces) == 1
    changed = (result.image != photo).any(-1)
    # the crop's square seen in the photo (its footprint), grown by 2 px for the bilinear rim
    square = np.ones((SIZE, SIZE), np.uint8)
    footprint = cv2.warpAffine(square, invert_affine(result.affines[0]), (128, 96), flags=cv2.INTER_NEAREST)
    footprint = cv2.dilate(footprint, np.ones((5, 5), np.uint8)).astype(bool)
    assert changed.any() and not changed[~footprint].any()  # the rest of the photo keeps its grey pixels
    assert footprint.mean() < 0.5
    assert any("rest of the photo is left unchanged" in n for n in restorer.task_notes())


def test_per_call_upscale_and_centre_face_options(tiny_cf_config):
    model = _variant_model(tiny_cf_config, "restoration")
    detector = FixedDetector([(30, 30), (64, 48)], eye_distance=12)
    restorer = FaceRestorer(model, detector=detector)
    photo = np.random.default_rng(6).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    prepared = [restorer.prepare(photo, upscale=2), restorer.prepare(photo, only_center_face=True)]
    assert [(r.upscale, r.only_center_face, len(r.cropped_faces)) for r in prepared] == [(2, False, 2), (1, True, 1)]
    done = restorer.complete([photo, photo], prepared)
    assert done[0].image.shape == (192, 256, 3) and done[1].image.shape == photo.shape
    assert restorer.upscale == 1 and restorer.only_center_face is False  # the restorer is unchanged
    with pytest.raises(ValueError, match="upscale must be positive"):
        restorer.prepare(photo, upscale=0)


def test_mask_files_and_folders_matched_by_name(tmp_path):
    folder = tmp_path / "masks"
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[2:4, 2:6] = 200  # light grey counts as white (>= 128)
    mask[5, 5] = 100
    write_image(folder / "face_a.png", mask)
    write_image(folder / "face_b.png", np.zeros((8, 6, 3), np.uint8))
    source = MaskSource(folder)
    got = source.mask_for(tmp_path / "faces" / "face_a.jpg", (8, 8, 3))
    assert got.sum() == 8 and got[2:4, 2:6].all()
    with pytest.raises(TaskError, match=r"no mask named face_c\.\* in"):
        source.mask_for("face_c.png", (8, 8, 3))
    with pytest.raises(TaskError, match="6x8 px but the image is 8x8 px"):
        source.mask_for("face_b.png", (8, 8, 3))
    single = MaskSource(folder / "face_a.png")  # one file: every input
    assert single.mask_for("anything.png", (8, 8, 3)).sum() == 8
    write_image(folder / "face_a.jpg", mask)
    with pytest.raises(TaskError, match="two masks named 'face_a'"):
        MaskSource(folder)
    with pytest.raises(TaskError, match="no such file or folder"):
        MaskSource(tmp_path / "missing")
    with pytest.raises(TaskError, match="marks no pixel"):
        checked_mask(np.zeros((4, 4), bool), (4, 4, 3))

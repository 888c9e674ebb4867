"""``codeformer-restore`` follows the weights' variant: defaults, ``--task``, ``-w`` notes, ``--mask``,
whole photos (tiny networks of our own layout, marked with a variant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from task_reference import published_colorization, published_inpainting

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.inference.cli import main
from codeformer_lightning.io import read_image, write_image
from codeformer_lightning.nn import CodeFormer

SIZE = 32


@pytest.fixture
def variant_weights(tmp_path, tiny_cf_config):
    """``make(variant)`` -> (weights file, the model it holds)."""

    def make(variant: str):
        torch.manual_seed(0)
        model = CodeFormer(**tiny_cf_config).eval()
        with torch.no_grad():
            model.quantize.embedding.weight.normal_()
        return save_weights(model, tmp_path / f"{variant}.safetensors", variant=variant), model

    return make


def _faces(folder, count: int = 3, holes: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aligned random faces written to ``folder`` as PNG: ``{stem: (face, white holes)}``."""
    rng = np.random.default_rng(7)
    faces = {}
    for k in range(count):
        face = rng.integers(0, 250, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), bool)
        if holes:
            top, left = rng.integers(0, SIZE - 12, 2)
            mask[top:top + 10, left:left + 12] = True
            face[mask] = 255
        write_image(folder / f"face{k}.png", face)
        faces[f"face{k}"] = (face, mask)
    return faces


def test_inpainting_weights_give_the_published_output_without_flags(tmp_path, variant_weights, capsys):
    weights, model = variant_weights("inpainting")
    faces = _faces(tmp_path / "in")
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "-o", str(out), "--weights", str(weights), "--aligned"]) == 0
    err = capsys.readouterr().err
    assert "task: inpainting: w=1, AdaIN off" in err and "from the weights' variant 'inpainting'" in err
    for stem, (face, mask) in faces.items():
        got = read_image(out / "final_results" / f"{stem}.png")
        np.testing.assert_array_equal(got[~mask], face[~mask])
        assert np.abs(got.astype(int) - published_inpainting(model, face)).max() <= 1


def test_mask_folder_is_matched_by_name_and_bad_masks_skip_only_their_image(tmp_path, variant_weights, capsys):
    weights, model = variant_weights("inpainting")
    faces = _faces(tmp_path / "in", count=4, holes=False)
    masks = tmp_path / "masks"
    holes = np.zeros((SIZE, SIZE), bool)
    holes[8:20, 4:16] = True
    write_image(masks / "face0.png", np.repeat(holes[..., None] * np.uint8(255), 3, axis=2))
    write_image(masks / "face1.jpg", np.repeat(holes[..., None] * np.uint8(255), 3, axis=2))
    write_image(masks / "face2.png", np.zeros((16, 16, 3), np.uint8))  # wrong size
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "-o", str(out), "--weights", str(weights), "--aligned",
                 "--mask", str(masks)]) == 0
    err = capsys.readouterr().err
    assert "processed 2 image(s)" in err and "skipped 2 file(s)" in err
    assert "16x16 px but the image is 32x32 px" in err and "no mask named face3.*" in err
    for stem in ("face0", "face1"):
        face = faces[stem][0]
        got = read_image(out / "final_results" / f"{stem}.png")
        np.testing.assert_array_equal(got[~holes], face[~holes])
        painted = face.copy()
        painted[holes] = 255  # what the network sees: the holes white, as published
        assert np.abs(got.astype(int) - published_inpainting(model, painted)).max() <= 1


def test_inpainting_of_whole_photos_is_refused_with_a_way_out(tmp_path, variant_weights, capsys):
    weights, _ = variant_weights("inpainting")
    _faces(tmp_path / "in", count=1)
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "inpainting works on aligned, cropped faces only" in err and "--aligned" in err
    assert not (tmp_path / "out").exists()


def test_colorization_defaults_explicit_w_note_and_task_override(tmp_path, variant_weights, capsys):
    weights, model = variant_weights("colorization")
    rng = np.random.default_rng(8)
    grey = np.repeat(rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8), 3, axis=2)
    write_image(tmp_path / "in" / "a.png", grey)
    write_image(tmp_path / "in" / "b.png", grey[::-1].copy())
    args = [str(tmp_path / "in"), "--weights", str(weights), "--aligned"]
    assert main([*args, "-o", str(tmp_path / "default")]) == 0
    err = capsys.readouterr().err
    assert "task: colorization: w=0, AdaIN on" in err and "note:" not in err
    got = read_image(tmp_path / "default" / "final_results" / "a.png")
    assert np.abs(got.astype(int) - published_colorization(model, grey)).max() <= 1
    # an explicit -w overrides, with one note for the run (not one per image)
    assert main([*args, "-o", str(tmp_path / "w05"), "-w", "0.5"]) == 0
    err = capsys.readouterr().err
    assert err.count("w=0.5 instead of the published w=0") == 1
    with torch.no_grad():
        at_half = model(torch.from_numpy(grey).permute(2, 0, 1)[None].float() / 127.5 - 1, w=0.5, adain=True)
    expected = ((at_half[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(read_image(tmp_path / "w05" / "final_results" / "a.png") - expected).max() <= 1
    # --task restoration: the restoration defaults (w=0.5) on the same weights
    assert main([*args, "-o", str(tmp_path / "task"), "--task", "restoration"]) == 0
    assert "task: restoration: w as given (default 0.5), AdaIN on (--task)" in capsys.readouterr().err
    np.testing.assert_array_equal(read_image(tmp_path / "task" / "final_results" / "a.png"),
                                  read_image(tmp_path / "w05" / "final_results" / "a.png"))


def test_mask_without_inpainting_is_an_argument_error(tmp_path, variant_weights, capsys):
    weights, _ = variant_weights("restoration")
    _faces(tmp_path / "in", count=1)
    write_image(tmp_path / "mask.png", np.full((SIZE, SIZE, 3), 255, np.uint8))
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights), "--aligned",
                 "--mask", str(tmp_path / "mask.png")]) == 2
    assert "--mask applies to inpainting; the task is restoration" in capsys.readouterr().err

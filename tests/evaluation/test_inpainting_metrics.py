"""Evaluation of inpainting: PSNR/SSIM inside the mask, and ``codeformer-evaluate`` following the
weights' variant (the published inpainting inference, masks from the white pixels or ``--mask``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from task_reference import published_inpainting

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.evaluation import psnr, ssim
from codeformer_lightning.evaluation.cli import main
from codeformer_lightning.evaluation.metrics import masked_psnr, masked_ssim
from codeformer_lightning.io import read_image, write_image
from codeformer_lightning.nn import CodeFormer

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS. no linear heads")
SIZE = 32


def _smooth(seed: int) -> np.ndarray:
    """A smooth random (SIZE, SIZE, 3) uint8 picture, no pure-white pixel."""
    import cv2

    coarse = np.random.default_rng(seed).integers(20, 230, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


def _holes() -> np.ndarray:
    holes = np.zeros((SIZE, SIZE), bool)
    holes[6:18, 8:24] = True
    return holes


def test_psnr_and_ssim_inside_the_mask_against_plain_computations():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, SIZE, SIZE, generator=g)
    restored = gt.clone()
    mask = torch.from_numpy(_holes())[None, None].expand(2, 1, SIZE, SIZE)
    noise = 0.05 * torch.randn(2, 3, SIZE, SIZE, generator=g)
    restored = torch.where(mask, (gt + noise).clamp(0, 1), gt)  # differences only inside the mask
    inside = mask.expand_as(gt)
    mse = [((restored[b] - gt[b])[inside[b]] ** 2).double().mean().item() for b in range(2)]
    expected = [10 * math.log10(1 / m) for m in mse]
    assert masked_psnr(restored, gt, mask).tolist() == pytest.approx(expected, abs=1e-4)
    assert (masked_psnr(restored, gt, mask) < psnr(restored, gt) - 5).all()  # whole image: mostly equal pixels
    # SSIM: the mean of the local map over the masked pixels; over every pixel it is the whole-image SSIM
    everywhere = torch.ones(2, 1, SIZE, SIZE, dtype=torch.bool)
    torch.testing.assert_close(masked_ssim(restored, gt, everywhere), ssim(restored, gt), atol=1e-6, rtol=0)
    outside = masked_ssim(restored, gt, ~mask)
    assert (masked_ssim(restored, gt, mask) < outside).all() and (outside > 0.9).all()
    assert math.isnan(masked_psnr(restored, gt, torch.zeros_like(mask))[0].item())


def test_evaluate_with_inpainting_weights_applies_the_published_inference(tmp_path, tiny_cf_config, capsys):
    torch.manual_seed(0)
    model = CodeFormer(**tiny_cf_config).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    weights = save_weights(model, tmp_path / "inpainting.safetensors", variant="inpainting")
    holes = _holes()
    lqs = {}
    for k, name in enumerate("ab"):
        gt = _smooth(k)
        lq = gt.copy()
        lq[holes] = 255
        write_image(tmp_path / "gt" / f"{name}.png", gt)
        write_image(tmp_path / "lq" / f"{name}.png", lq)
        lqs[name] = (lq, gt)
    out = tmp_path / "eval"
    assert main(["--weights", str(weights), "--lq", str(tmp_path / "lq"), "--gt", str(tmp_path / "gt"),
                 "--metrics", "psnr", "ssim", "--out", str(out), "--save-restored"]) == 0
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]
    assert run["label"] == "w=1" and run["metrics"] == ["psnr", "ssim", "psnr_mask", "ssim_mask"]
    assert any("inpainting: w=1, AdaIN off" in n for n in run["notes"])
    for name, (lq, gt) in lqs.items():
        saved = read_image(out / "restored" / "w_1" / f"{name}.png")
        np.testing.assert_array_equal(saved[~holes], lq[~holes])
        assert np.abs(saved.astype(int) - published_inpainting(model, lq)).max() <= 1
        # the numbers are those of the saved picture, inside the mask and over the whole image
        r = torch.from_numpy(saved).permute(2, 0, 1)[None].float() / 255
        t = torch.from_numpy(gt).permute(2, 0, 1)[None].float() / 255
        m = torch.from_numpy(holes)[None, None]
        values = run["per_image"][name]
        assert values["psnr_mask"] == pytest.approx(masked_psnr(r, t, m).item(), abs=1e-3)
        assert values["ssim_mask"] == pytest.approx(masked_ssim(r, t, m).item(), abs=1e-4)
        assert values["psnr"] == pytest.approx(psnr(r, t).item(), abs=1e-3)
        assert values["psnr_mask"] < values["psnr"]
    assert "PSNR in mask (dB)" in (out / "metrics.md").read_text()


def test_folder_mode_with_masks_scores_inside_them_and_explains_bad_masks(tmp_path, capsys):
    holes = _holes()
    gt, restored = _smooth(3), _smooth(3)
    restored[holes] = _smooth(4)[holes]
    for name in "ab":
        write_image(tmp_path / "gt" / f"{name}.png", gt)
        write_image(tmp_path / "restored" / f"{name}.png", restored)
    write_image(tmp_path / "masks" / "a.png", np.repeat(holes[..., None] * np.uint8(255), 3, axis=2))
    write_image(tmp_path / "masks" / "b.png", np.full((8, 8, 3), 255, np.uint8))  # wrong size
    out = tmp_path / "eval"
    assert main(["--restored", str(tmp_path / "restored"), "--gt", str(tmp_path / "gt"), "--mask",
                 str(tmp_path / "masks"), "--metrics", "psnr", "--out", str(out)]) == 0
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]
    assert list(run["per_image"]) == ["a"] and "8x8 px but the image is 32x32 px" in run["failed"]["b"]
    r = torch.from_numpy(restored).permute(2, 0, 1)[None].float() / 255
    t = torch.from_numpy(gt).permute(2, 0, 1)[None].float() / 255
    expected = masked_psnr(r, t, torch.from_numpy(holes)[None, None]).item()
    assert run["per_image"]["a"]["psnr_mask"] == pytest.approx(expected, abs=1e-3) and expected < 30
    assert main(["--restored", str(tmp_path / "restored"), "--gt", str(tmp_path / "gt"), "--mask",
                 str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err

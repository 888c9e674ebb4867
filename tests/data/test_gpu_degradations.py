"""The torch batch path (run on CPU here): blur moments, JPEG approximation, noise, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import smooth_image

from codeformer_lightning.data import degradations as D
from codeformer_lightning.data import gpu_degradations as G


def _batch(n=3, size=64):
    imgs = np.stack([smooth_image(size, i) for i in range(n)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_fft_blur_matches_numpy_path_and_impulse_moments():
    x = _batch(2, 48) * 127.5 + 127.5
    sx, sy, th = (
        torch.tensor([2.0, 5.0], dtype=torch.float64),
        torch.tensor([2.0, 1.5], dtype=torch.float64),
        torch.tensor([0.0, 0.7], dtype=torch.float64),
    )
    kernels = G.gaussian_kernels(sx, sy, th, 41)
    out = G.fft_blur(x, kernels)
    for i in range(2):
        img = x[i].permute(1, 2, 0).round().byte().numpy()
        ref = D.blur_and_downsample(img, kernels[i].double().numpy(), None)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=0.1)
    impulse = torch.zeros(1, 1, 64, 64)
    impulse[0, 0, 32, 32] = 1
    resp = G.fft_blur(
        impulse,
        G.gaussian_kernels(
            torch.tensor([3.0], dtype=torch.float64),
            torch.tensor([1.5], dtype=torch.float64),
            torch.tensor([math.pi / 2], dtype=torch.float64),
            41,
        ),
    )[0, 0]
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    var_x = float((resp * (xs - 32) ** 2).sum() / resp.sum())
    var_y = float((resp * (ys - 32) ** 2).sum() / resp.sum())
    assert var_x == pytest.approx(1.5**2, rel=0.02) and var_y == pytest.approx(
        3.0**2, rel=0.02
    )  # rotated 90 deg


def test_jpeg_approximation_tracks_libjpeg():
    img = smooth_image(64, 9)
    t = torch.from_numpy(img).permute(2, 0, 1).float()
    errors, gaps = [], []
    for q in (10, 40, 90):
        approx = G.jpeg_approx(t, q).permute(1, 2, 0).numpy()
        real = D.jpeg_round_trip(img, q).astype(np.float32)
        errors.append(np.abs(approx - img).mean())
        gaps.append(np.abs(approx - real).mean() / max(np.abs(real - img).mean(), 1e-6))
    assert errors[0] > errors[1] > errors[2]
    assert max(gaps) < 1.0  # closer to libjpeg's output than libjpeg's output is to the original


def test_degrade_batch_seeded_ranges_and_noise():
    x = _batch()
    a, pa = G.degrade_batch(x, "stage2", torch.Generator().manual_seed(0))
    b, _ = G.degrade_batch(x, "stage2", torch.Generator().manual_seed(0))
    c, _ = G.degrade_batch(x, "stage2", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert ((pa["scale"] >= 4) & (pa["scale"] <= 30)).all()
    assert ((pa["jpeg_quality"] >= 30) & (pa["jpeg_quality"] <= 80)).all()
    flat = torch.zeros(4, 3, 64, 64)
    cfg = D.DegradationConfig(blur=False, downsample=False, jpeg=False, noise_range=(10.0, 10.0))
    noisy, _ = G.degrade_batch(flat, cfg, torch.Generator().manual_seed(0))
    assert float((noisy - flat).std() * 127.5) == pytest.approx(10.0, rel=0.05)
    same, _ = G.degrade_batch(x, "none", torch.Generator().manual_seed(0))
    assert (same - x).abs().max() <= 1 / 127.5  # only 8-bit rounding


def _psnr(lq: np.ndarray, gt: np.ndarray) -> float:
    mse = max(float(np.mean((lq.astype(np.float64) - gt.astype(np.float64)) ** 2)), 1e-10)
    return 10 * math.log10(255.0**2 / mse)


def test_the_batch_path_scales_with_the_face_size_as_the_numpy_path_does():
    """A 64 px face under the stage II preset: the batch path's PSNR distribution is the numpy
    path's (both scale the 512 px ranges to 64 px), far from the unscaled ranges'."""
    import cv2
    from skimage import data

    face = cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
    n = 64
    x = torch.from_numpy(np.repeat(face[None], n, 0)).permute(0, 3, 1, 2).float() / 127.5 - 1

    def as_uint8(batch: torch.Tensor) -> np.ndarray:
        return ((batch + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def median_psnr(images) -> float:
        return float(np.median([_psnr(lq, face) for lq in images]))

    batch, params = G.degrade_batch(x, "stage2", torch.Generator().manual_seed(0))
    unscaled_cfg = D.preset("stage2").replace(reference_size=None)
    unscaled, _ = G.degrade_batch(x, unscaled_cfg, torch.Generator().manual_seed(0))
    numpy_path = [D.degrade(face, "stage2", np.random.default_rng([3, i]))[0] for i in range(n)]
    ours, reference, old = median_psnr(as_uint8(batch)), median_psnr(numpy_path), median_psnr(as_uint8(unscaled))
    assert ((params["scale"] >= 4) & (params["scale"] <= 30)).all()  # the draws stay in 512 px units
    assert abs(ours - reference) < 1.0, (ours, reference)
    assert old < reference - 3.0, (old, reference)

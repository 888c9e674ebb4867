"""Statistics of the degradation model: blur moments, factors, noise, JPEG, seeding, presets, colours, masks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import scipy.stats
import torch
from conftest import smooth_image
from reference_packages import import_reference

from codeformer_lightning.data import color, tasks
from codeformer_lightning.data import degradations as D
from codeformer_lightning.data import gpu_degradations as G


def _second_moments(response: np.ndarray) -> np.ndarray:
    """Covariance ``[[xx, xy], [xy, yy]]`` of a non-negative 2-D response around its centroid."""
    w = response / response.sum()
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    mx, my = (w * xs).sum(), (w * ys).sum()
    dx, dy = xs - mx, ys - my
    return np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]])


def _impulse(size: int = 96) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 2, size // 2] = 255
    return img


@pytest.mark.parametrize("sigma", [1.5, 3.0, 5.0])
def test_isotropic_blur_of_impulse_has_variance_sigma_squared(sigma):
    out = D.blur_and_downsample(_impulse(), D.np.outer(*(2 * [D.gaussian_kernel_1d(sigma)])), None)
    cov = _second_moments(out[:, :, 0].astype(np.float64))
    np.testing.assert_allclose(np.diag(cov), [sigma**2, sigma**2], rtol=0.01)
    assert abs(cov[0, 1]) < 1e-6
    assert out[:, :, 0].sum() == pytest.approx(255.0, rel=1e-4)  # the kernel sums to 1


@pytest.mark.parametrize("sx,sy,theta", [(4.0, 1.5, 0.0), (4.0, 1.5, math.pi / 4), (2.0, 5.0, -1.0)])
def test_anisotropic_blur_of_impulse_has_rotated_covariance(sx, sy, theta):
    kernel = D.gaussian_kernel_2d(sx, sy, theta)
    out = D.blur_and_downsample(_impulse(), kernel, None)
    cov = _second_moments(out[:, :, 0].astype(np.float64))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    expected = rot @ np.diag([sx**2, sy**2]) @ rot.T
    np.testing.assert_allclose(cov, expected, atol=0.02 * sx * sy)


@pytest.mark.parametrize(
    "kernel",
    [
        D.np.outer(*(2 * [D.gaussian_kernel_1d(2.0)])),
        D.gaussian_kernel_2d(6.0, 2.0, 0.5),
        D.gaussian_kernel_2d(1.0, 3.0, 2.0),
    ],
)
@pytest.mark.parametrize("out_size", [(64, 64), (23, 17), (5, 5)])
def test_fast_blur_downsample_equals_filter2d_then_resize(kernel, out_size):
    img = smooth_image(64, 3)
    terms = D.separable_terms(kernel, max_terms=41)
    fast = D._blur_downsample_matrices(img, terms, out_size)
    ref = cv2.filter2D(
        img.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101
    )
    if out_size != (64, 64):
        ref = cv2.resize(ref, out_size[::-1], interpolation=cv2.INTER_LINEAR)
    assert fast.shape == (*out_size, 3)
    np.testing.assert_allclose(fast, ref, atol=0.06)  # the SVD tolerance bound (0.05 grey levels) + float32


def test_downsample_factor_range_respected():
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(400):
        p = D.sample_params(D.PRESETS["stage2"], rng, (512, 512))
        assert 4.0 <= p.scale <= 30.0
        # the published size: int(512 // r), the floor of the true size
        assert p.out_size == (math.floor(512 / p.scale), math.floor(512 / p.scale))
        scales.append(p.scale)
    assert min(scales) < 5 and max(scales) > 29  # the whole range is used
    small = [D.sample_params(D.PRESETS["stage3_small"], rng, (512, 512)).scale for _ in range(400)]
    assert 1.0 <= min(small) < 2 and 11 < max(small) <= 12


def test_known_factor_on_a_checkerboard():
    # 4x4 blocks shrunk by r = 4: every output pixel averages the block's centre -> a pixel checkerboard
    board = ((np.arange(64)[:, None] // 4 + np.arange(64)[None, :] // 4) % 2 * 255).astype(np.uint8)
    img = np.repeat(board[:, :, None], 3, axis=2)
    low = D.blur_and_downsample(img, None, (16, 16))
    expected = ((np.arange(16)[:, None] + np.arange(16)[None, :]) % 2 * 255).astype(np.float32)
    np.testing.assert_allclose(low[:, :, 1], expected, atol=1e-4)
    params = D.DegradationParams(scale=4.0, out_size=(16, 16))
    lq = D.apply_degradation(img, params, np.random.default_rng(0))
    assert lq.shape == img.shape and lq.dtype == np.uint8


def test_noise_std_matches():
    cfg = D.DegradationConfig(blur=False, downsample=False, jpeg=False, noise_range=(12.0, 12.0))
    img = np.full((128, 128, 3), 128, np.uint8)
    lq, params = D.degrade(img, cfg, np.random.default_rng(1))
    assert params.noise_sigma == 12.0
    diff = lq.astype(np.float64) - img
    assert diff.std() == pytest.approx(12.0, rel=0.03)
    assert abs(diff.mean()) < 0.3


def test_lower_jpeg_quality_gives_larger_error():
    img = smooth_image(128, 5)
    errors = [np.abs(D.jpeg_round_trip(img, q).astype(np.float64) - img).mean() for q in (10, 40, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    # the whole pipeline at a fixed quality picks it up too
    cfg = D.DegradationConfig(blur=False, downsample=False, noise=False, jpeg_range=(20, 20))
    lq, params = D.degrade(img, cfg, np.random.default_rng(0))
    assert params.jpeg_quality == 20
    np.testing.assert_array_equal(lq, D.jpeg_round_trip(img, 20))


def test_identical_seeds_identical_pairs_and_different_seeds_differ():
    img = smooth_image(64, 7)
    for name in ("stage2", "stage3_small", "stage3_large"):
        a, pa = D.degrade(img, name, np.random.default_rng([3, 0, 5]))
        b, pb = D.degrade(img, name, np.random.default_rng([3, 0, 5]))
        c, _ = D.degrade(img, name, np.random.default_rng([3, 0, 6]))
        np.testing.assert_array_equal(a, b)
        assert pa.scale == pb.scale and pa.jpeg_quality == pb.jpeg_quality
        assert not np.array_equal(a, c)


def test_presets_have_published_ranges_and_none_is_identity():
    # values of the published options/*.yml (docs/recipe.md checks them against the configs too)
    s2, s3 = D.preset("stage2"), D.preset("stage3_small")
    ranges = ("blur_sigma", "downsample_range", "noise_range", "jpeg_range")
    assert [getattr(s2, r) for r in ranges] == [(1, 15), (4, 30), (0, 20), (30, 80)]
    assert [getattr(s3, r) for r in ranges] == [(0.1, 10), (1, 12), (0, 15), (60, 100)]
    assert D.preset("stage3_large") == s2
    assert s2.kernel_size == 41 and s2.anisotropic_prob == 0.5 and s2.motion_blur_prob == 0
    # stage II / III options set no colour changes: the presets change no colours
    for name in ("stage2", "stage3_small", "stage3_large"):
        cfg = D.preset(name)
        assert (cfg.color_jitter_prob, cfg.gray_prob, cfg.color_jitter_pt_prob) == (0, 0, 0), name
    col = D.preset("colorization")
    assert [getattr(col, r) for r in ranges] == [getattr(s2, r) for r in ranges]
    assert (col.color_jitter_prob, col.color_jitter_shift, col.color_jitter_pt_prob, col.gray_prob) == (
        0.3, 20, 0.3, 0.01,
    )  # fmt: skip
    # the dataset code's defaults for the torchvision-style jitter
    assert (col.brightness, col.contrast, col.saturation, col.hue) == ((0.5, 1.5), (0.5, 1.5), (0, 1.5), (-0.1, 0.1))
    extra = D.preset("stage2_jitter")
    assert extra == s2.replace(color_jitter_prob=0.3, color_jitter_shift=20.0, gray_prob=0.01)
    img = smooth_image(32, 1)
    lq, _ = D.degrade(img, "none", np.random.default_rng(0))
    np.testing.assert_array_equal(lq, img)
    with pytest.raises(ValueError, match="valid presets: none, stage2, stage3_small, stage3_large, colorization"):
        D.preset("stage4")


def test_jpeg_quality_is_the_integer_part_of_a_uniform_draw():
    rng = np.random.default_rng(0)
    qualities = np.array([D.sample_params(D.PRESETS["stage2"], rng, (64, 64)).jpeg_quality for _ in range(3000)])
    # published: int(uniform(30, 80)) -> 30..79, each about equally often, 80 never
    assert qualities.min() == 30 and qualities.max() == 79
    counts = np.bincount(qualities - 30, minlength=50)
    assert scipy.stats.chisquare(counts).pvalue > 0.001  # uniform over the 50 values


def test_kernel_sampling_covers_iso_and_aniso_and_angles():
    rng = np.random.default_rng(0)
    kinds, thetas = [], []
    for _ in range(300):
        p = D.sample_params(D.PRESETS["stage2"], rng, (512, 512))  # the preset's own size: 41 taps
        kinds.append(p.kernel_kind)
        assert p.kernel.shape == (41, 41) and p.kernel.sum() == pytest.approx(1.0)
        assert 1.0 <= p.sigma_x <= 15.0 and 1.0 <= p.sigma_y <= 15.0
        if p.kernel_kind == "aniso":
            thetas.append(p.theta)
    assert 0.4 < kinds.count("aniso") / len(kinds) < 0.6
    assert min(thetas) < -2.5 and max(thetas) > 2.5


def test_motion_blur_kernel_and_fallback_path():
    k = D.motion_kernel(15, 0.0)
    assert k.sum() == pytest.approx(1.0)
    cov = _second_moments(k)
    assert cov[0, 0] == pytest.approx((15**2 - 1) / 12, rel=0.15) and cov[1, 1] < 0.5  # a horizontal line
    cfg = D.DegradationConfig(motion_blur_prob=1.0, downsample=False, noise=False, jpeg=False)
    lq, p = D.degrade(smooth_image(64, 2), cfg, np.random.default_rng(0))
    assert p.kernel_kind == "motion" and lq.shape == (64, 64, 3)


def _jitter_image(size: int = 48) -> np.ndarray:
    """Random colours in [0, 1] with grey, black and white patches (ties of the hue formulas)."""
    img = np.random.default_rng(3).random((size, size, 3)).astype(np.float32) ** 1.5
    img[:8, :8], img[8:16, :8], img[16:24, :8] = 0.5, 0.0, 1.0
    img[24:32, :8] = (0.8, 0.8, 0.2)  # two equal maxima
    return img


@pytest.mark.parametrize(
    "name,factor",
    [("brightness", 0.6), ("brightness", 1.4), ("contrast", 0.5), ("contrast", 1.5), ("saturation", 0.0),
     ("saturation", 1.5), ("hue", -0.1), ("hue", 0.1), ("hue", 0.5)],
)  # fmt: skip
def test_color_jitter_ops_match_torchvision(name, factor):
    tvf = import_reference("torchvision.transforms.functional")
    img = _jitter_image()
    ours = getattr(color, f"adjust_{name}")(img * 255, factor) / 255
    ref = getattr(tvf, f"adjust_{name}")(torch.from_numpy(img).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_color_jitter_order_matters_and_numpy_and_torch_paths_agree():
    img = _jitter_image() * 255
    factors = {"brightness": 1.3, "contrast": 0.6, "saturation": 0.4, "hue": 0.08}
    forward = color.color_jitter(img, [0, 1, 2, 3], factors)
    backward = color.color_jitter(img, [3, 2, 1, 0], factors)
    assert np.abs(forward - backward).max() > 1  # the drawn order is applied
    by_torch = G.color_jitter(torch.from_numpy(img).permute(2, 0, 1), [3, 2, 1, 0], factors)
    np.testing.assert_allclose(by_torch.permute(1, 2, 0).numpy(), backward, atol=1e-3)


def test_shift_and_gray():
    img = smooth_image(32, 4).astype(np.float32)
    gray = color.to_gray(img)
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    np.testing.assert_allclose(gray[:, :, 0], img @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-3)
    shifted = color.shift_channels(np.full((4, 4, 3), 100, np.float32), [10.5, -20, 200])
    assert shifted[0, 0].tolist() == [110.5, 80, 255]


def test_colorization_preset_changes_only_colors_and_rounds_once():
    img = smooth_image(64, 5)
    cfg = D.preset("colorization").replace(blur=False, downsample=False, noise=False, jpeg=False)
    changed = 0
    for seed in range(40):
        lq, p = D.degrade(img, cfg, np.random.default_rng(seed))
        expected = img.astype(np.float32)
        if p.color_shift is not None:
            expected = np.clip(expected + p.color_shift.astype(np.float32), 0, 255)
        if p.gray:
            expected = color.to_gray(expected)
        if p.jitter_order is not None:
            expected = color.color_jitter(expected, p.jitter_order, p.jitter_factors)
        np.testing.assert_array_equal(lq, np.clip(np.rint(expected), 0, 255).astype(np.uint8))
        changed += p.changes_colors
    assert 10 < changed < 30  # 1 - 0.7 * 0.99 * 0.7 = 51% of the draws change colours


def test_grayscale_and_inpainting_inputs():
    img = smooth_image(64, 6)
    lq = tasks.grayscale_input(img, np.random.default_rng(0), cast_prob=0.0)
    assert (lq[:, :, 0] == lq[:, :, 2]).all()
    lq, mask = tasks.inpainting_input(img, np.random.default_rng(1))
    assert mask.dtype == bool and 0 < mask.mean() < 0.9
    np.testing.assert_array_equal(lq[~mask], img[~mask])
    assert np.unique(lq[mask]).tolist() == [255]  # published: white strokes
    with pytest.raises(ValueError, match="degradation 'colorization'"):
        tasks.check_task("colorization")


def test_brush_strokes_follow_the_published_geometry():
    # one segment of a 40 px brush: a capsule whose widest inscribed disc has radius 20
    strokes = tasks.BrushStrokes(strokes=(1, 1), vertices=(1, 1), width=(40, 40.5))
    mask = tasks.brush_stroke_mask(512, 512, np.random.default_rng(2), strokes)
    inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)
    assert 19 <= inside.max() <= 21.5
    # masks of any size cover about the same fraction (widths and lengths scale with the image)
    coverage = {
        size: np.mean([tasks.brush_stroke_mask(size, size, np.random.default_rng(i)).mean() for i in range(200)])
        for size in (64, 512)
    }
    assert abs(coverage[64] - coverage[512]) < 0.03, coverage


def test_config_validation_messages():
    with pytest.raises(ValueError, match="jpeg_range"):
        D.DegradationConfig(jpeg_range=(0, 200))
    with pytest.raises(ValueError, match="low end above high end"):
        D.DegradationConfig(noise_range=(5, 1))
    with pytest.raises(ValueError, match="uint8 RGB"):
        D.degrade(np.zeros((8, 8), np.uint8), "stage2", np.random.default_rng(0))


@pytest.mark.parametrize("out_size", [(64, 64), (40, 40)])
def test_full_resolution_separable_route_matches_filter2d(out_size):
    img = smooth_image(64, 8)
    kernel = D.gaussian_kernel_2d(3.0, 1.2, 0.4)
    terms = D.separable_terms(kernel)
    fast = D._separable_full_res(img, terms)
    ref = cv2.filter2D(
        img.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101
    )
    np.testing.assert_allclose(fast, ref, atol=0.08)
    routed = D.blur_and_downsample(img, kernel, out_size)
    ref = ref if out_size == (64, 64) else cv2.resize(ref, out_size[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(routed, ref, atol=0.08)


def test_noise_is_per_channel_and_seeded():
    a = D.gaussian_noise((64, 64, 3), 5.0, np.random.default_rng(3))
    b = D.gaussian_noise((64, 64, 3), 5.0, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    for ch in range(3):
        assert a[:, :, ch].std() == pytest.approx(5.0, rel=0.06)
    assert abs(np.corrcoef(a[:, :, 0].ravel(), a[:, :, 1].ravel())[0, 1]) < 0.05

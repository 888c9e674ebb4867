"""Statistics of the degradation model: blur moments, factors, noise, JPEG, seeding, presets."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from conftest import smooth_image

from codeformer_lightning.data import degradations as D


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
        assert p.out_size == (round(512 / p.scale), round(512 / p.scale))
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
    s2, s3 = D.preset("stage2"), D.preset("stage3_small")
    assert (s2.blur_sigma, s2.downsample_range, s2.noise_range, s2.jpeg_range) == (
        (1, 15),
        (4, 30),
        (0, 20),
        (30, 80),
    )
    assert (s3.blur_sigma, s3.downsample_range, s3.noise_range, s3.jpeg_range) == (
        (0.1, 10),
        (1, 12),
        (0, 15),
        (60, 100),
    )
    assert D.preset("stage3_large") == s2
    assert s2.kernel_size == 41 and s2.anisotropic_prob == 0.5
    img = smooth_image(32, 1)
    lq, _ = D.degrade(img, "none", np.random.default_rng(0))
    np.testing.assert_array_equal(lq, img)
    with pytest.raises(ValueError, match="valid presets: none, stage2, stage3_small, stage3_large"):
        D.preset("stage4")


def test_kernel_sampling_covers_iso_and_aniso_and_angles():
    rng = np.random.default_rng(0)
    kinds, thetas = [], []
    for _ in range(300):
        p = D.sample_params(D.PRESETS["stage2"], rng, (64, 64))
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


def test_jitter_and_gray():
    img = smooth_image(32, 4)
    gray = D.to_gray3(img)
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    shifted = D.shift_colors(np.full((4, 4, 3), 100, np.uint8), np.array([10, -20, 200]))
    assert shifted[0, 0].tolist() == [110, 80, 255]


def test_colorization_and_inpainting_inputs():
    img = smooth_image(64, 6)
    lq = D.colorization_input(img, np.random.default_rng(0), jitter_prob=0.0)
    assert (lq[:, :, 0] == lq[:, :, 2]).all()
    lq, mask = D.inpainting_input(img, np.random.default_rng(1))
    assert mask.dtype == bool and 0 < mask.mean() < 0.9
    np.testing.assert_array_equal(lq[~mask], img[~mask])
    painted = np.unique(lq[mask])
    assert painted.tolist() in ([0], [255])


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

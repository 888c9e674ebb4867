"""The fast blur + downsample routes against the plain reference: full 41x41 ``cv2.filter2D``, then
``cv2.resize``. Every route must agree within 0.05 grey levels (0..255 scale) for any kernel of the
model: the crop and the SVD truncation are each bounded by 0.025 grey levels, float32 adds ~1e-4."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from codeformer_lightning.data import degradations as D

ROUTES = ("matrix", "separable", "direct", "fft")
#: crop bound (0.025) + SVD truncation bound (0.025) + float32 rounding
TOLERANCE = 0.05


def _reference(image: np.ndarray, kernel: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """The published pipeline's blur and downsample: the full kernel, float32, then bilinear resize."""
    blurred = cv2.filter2D(
        image.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101
    )
    if out_size == image.shape[:2]:
        return blurred
    return cv2.resize(blurred, out_size[::-1], interpolation=cv2.INTER_LINEAR)


def _random_image(h: int, w: int, seed: int) -> np.ndarray:
    """White noise: the hardest case for a truncated kernel (every tap sees a full-range value)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


#: (sigma_x, sigma_y, theta): thin, rotated, round, tiny and wide kernels of stage II / III
KERNELS = [
    (0.1, 0.1, 0.0),
    (0.1, 10.0, 0.7),
    (0.2, 8.3, -2.45),  # nearly equal singular values of even and odd parts
    (0.5, 3.0, math.pi / 4),
    (1.0, 1.0, 0.0),
    (2.2, 1.5, 3.04),
    (4.0, 0.3, -2.6),
    (9.0, 2.5, 1.2),
    (10.0, 9.5, 0.3),
    (15.0, 15.0, 0.0),
]
FACTORS = [1.0, 1.07, 1.9, 4.3, 11.6]


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_matches_the_full_kernel_reference(route):
    img = _random_image(61, 53, 0)  # odd, non-square: exercises both borders and both axes
    worst = 0.0
    for sx, sy, theta in KERNELS:
        full = D.gaussian_kernel_2d(sx, sy, theta)
        kernel = D.crop_kernel(full, D.SVD_TOLERANCE / 2)
        terms = D.separable_terms(kernel, D.SVD_TOLERANCE / 2, max_terms=41)
        for r in FACTORS:
            out_size = (max(1, round(61 / r)), max(1, round(53 / r)))
            fast = D._blur_by_route(img, kernel, terms, out_size, route)
            assert fast.shape == (*out_size, 3) and fast.dtype == np.float32
            worst = max(worst, float(np.abs(fast - _reference(img, full, out_size)).max()))
    assert worst <= TOLERANCE


def test_routed_blur_matches_reference_for_random_draws_of_every_preset():
    img = _random_image(72, 72, 1)
    rng = np.random.default_rng(2)
    for name in ("stage2", "stage3_small"):
        for _ in range(25):
            p = D.sample_params(D.preset(name), rng, img.shape[:2])
            fast = D.blur_and_downsample(img, p.kernel, p.out_size)
            np.testing.assert_allclose(fast, _reference(img, p.kernel, p.out_size), rtol=0, atol=TOLERANCE)


def test_motion_kernels_are_not_point_symmetric_and_still_match():
    img = _random_image(40, 48, 3)
    for length, angle in ((5, 0.3), (17, -1.2), (25, 2.9)):
        kernel = D.motion_kernel(length, angle)
        for out_size in ((40, 48), (13, 16)):
            fast = D.blur_and_downsample(img, kernel, out_size)
            np.testing.assert_allclose(fast, _reference(img, kernel, out_size), rtol=0, atol=TOLERANCE)


def test_crop_kernel_keeps_only_the_support():
    assert D.crop_kernel(D.gaussian_kernel_2d(0.1, 0.1, 0.0)).shape == (1, 1)
    assert D.crop_kernel(D.gaussian_kernel_2d(0.1, 0.3, 0.5)).shape[0] <= 3
    assert D.crop_kernel(D.gaussian_kernel_2d(1.0, 1.0, 0.0)).shape[0] <= 11
    assert D.crop_kernel(D.gaussian_kernel_2d(10.0, 10.0, 0.0)).shape == (41, 41)
    for sx, sy, theta in KERNELS:
        full = D.gaussian_kernel_2d(sx, sy, theta)
        cropped = D.crop_kernel(full, 0.025)
        assert cropped.shape[0] % 2 == 1
        # the dropped mass moves no pixel of a 0..255 image by more than the tolerance
        assert 255.0 * (full.sum() - cropped.sum()) <= 0.025


def test_separable_terms_of_symmetric_kernels_are_exactly_even_or_odd():
    for sx, sy, theta in KERNELS:
        kernel = D.crop_kernel(D.gaussian_kernel_2d(sx, sy, theta), 0.025)
        terms = D.separable_terms(kernel, 0.025, max_terms=41)
        for v, h in terms:
            assert np.array_equal(v, v[::-1]) or np.array_equal(v, -v[::-1])
            assert np.array_equal(h, h[::-1]) or np.array_equal(h, -h[::-1])
        rebuilt = sum(np.outer(v, h) for v, h in terms)
        assert 255.0 * np.abs(rebuilt - kernel).sum() <= 0.025  # the bound the truncation promises


@pytest.mark.parametrize("shape", [(64, 48), (7, 5), (1, 9)])
def test_fft_correlate_equals_filter2d(shape):
    img = _random_image(*shape, 4)
    for kernel in (
        D.gaussian_kernel_2d(6.0, 0.4, 0.9),
        D.motion_kernel(19, 0.4),
        D.gaussian_kernel_2d(1, 2, 0, 5),
    ):
        planes = D.fft_correlate(img, kernel)
        assert [p.shape for p in planes] == 3 * [shape]
        np.testing.assert_allclose(np.dstack(planes), _reference(img, kernel, shape), rtol=0, atol=2e-3)


def test_router_prefers_cheap_routes_at_512_px():
    """What the cost model decides at the training size (the timings behind it: the benchmark's --profile)."""
    size = (512, 512)

    def route(kernel, r):
        kernel = D.crop_kernel(kernel, D.SVD_TOLERANCE / 2)
        terms = D.separable_terms(kernel, D.SVD_TOLERANCE / 2)
        out = (round(512 / r), round(512 / r))
        costs = D._route_costs(size, out, kernel.shape[0], terms)
        return min(costs, key=costs.get)

    iso = np.outer(D.gaussian_kernel_1d(5.0), D.gaussian_kernel_1d(5.0))
    assert route(iso, 8.0) == "matrix"  # small output: evaluate only the pixels the resize reads
    assert route(iso, 1.0) == "separable"  # rank 1 at full size
    assert route(D.gaussian_kernel_2d(8.0, 0.3, 0.7), 1.0) == "fft"  # thin, rotated, 41 taps: rank ~35
    assert route(D.gaussian_kernel_2d(1.0, 0.3, 0.7), 1.0) in ("direct", "separable")  # a few taps


def _flips_only_at_rounding_ties(fast_u8: np.ndarray, ref: np.ndarray) -> None:
    """``fast_u8`` equals ``rint(ref)`` except by one grey level where ``ref`` is within the tolerance
    of a rounding boundary (a bilinear tap of weight 1/2 makes x.5 values common)."""
    rounded = np.clip(np.rint(ref), 0, 255)
    flipped = fast_u8 != rounded
    assert np.abs(fast_u8.astype(np.float64) - rounded).max() <= 1
    assert (np.abs(np.abs(ref[flipped] - np.floor(ref[flipped])) - 0.5) <= TOLERANCE).all()


def test_pipeline_without_noise_and_jpeg_rounds_like_the_reference():
    """End to end (uint8 out): the same grey levels as the rounded reference, up to rounding ties."""
    img = _random_image(96, 96, 5)
    rng = np.random.default_rng(6)
    # no downsample: the pipeline's output is the rounded blur itself
    cfg = D.preset("stage3_small").replace(
        downsample=False, noise=False, jpeg=False, color_jitter_prob=0.0, gray_prob=0.0
    )
    for _ in range(10):
        lq, p = D.degrade(img, cfg, rng)
        _flips_only_at_rounding_ties(lq, _reference(img, p.kernel, (96, 96)))
    # with the downsample: the low-resolution image before JPEG and the resize back
    for _ in range(20):
        p = D.sample_params(D.preset("stage3_small"), rng, img.shape[:2])
        low = np.clip(np.rint(D.blur_and_downsample(img, p.kernel, p.out_size)), 0, 255)
        _flips_only_at_rounding_ties(low, _reference(img, p.kernel, p.out_size))

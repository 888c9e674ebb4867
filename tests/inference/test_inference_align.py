"""Alignment: template, Umeyama fit, inverse, warps and rescaling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from codeformer_lightning.inference.align import (
    FFHQ_TEMPLATE_512,
    apply_affine,
    estimate_alignment,
    face_template,
    invert_affine,
    rescale_affine,
    similarity_transform,
    warp_face,
)


def _similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


# The published CodeFormer's 5-point FFHQ template at 512 px (facexlib's; sczhou/CodeFormer
# facelib/utils/face_restoration_helper.py) and its 3-point variant (eyes, mouth centre, whole pixels).
PUBLISHED_TEMPLATE_512 = [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]]
PUBLISHED_TEMPLATE_3_POINTS = [[192, 240], [319, 240], [257, 371]]


def test_template_equals_the_published_one_at_every_size():
    assert FFHQ_TEMPLATE_512.shape == (5, 2) and FFHQ_TEMPLATE_512.dtype == np.float32
    for size in (512, 32, 100):
        np.testing.assert_allclose(face_template(size), np.array(PUBLISHED_TEMPLATE_512) * size / 512, rtol=1e-6)
    # the published 3-point template is the same face: eyes and mouth centre within a pixel
    three = np.stack([FFHQ_TEMPLATE_512[0], FFHQ_TEMPLATE_512[1], FFHQ_TEMPLATE_512[3:].mean(0)])
    assert np.abs(three - np.array(PUBLISHED_TEMPLATE_3_POINTS)).max() < 1.0
    with pytest.raises(ValueError):
        face_template(0)


def test_template_fills_the_crop_by_the_ffhq_alignment_rule():
    """FFHQ's own crop rule (NVlabs ffhq-dataset: an oriented square centred 0.1 of the way from the eyes
    to the mouth, half-side max(2 x eye distance, 1.8 x eye-to-mouth distance)) applied to the template's
    landmarks gives back, up to the template's averaging, the 512 px square it lives in: upright,
    centred, of side 512."""
    left_eye, right_eye, _, mouth_l, mouth_r = np.array(PUBLISHED_TEMPLATE_512)
    eye_avg, mouth_avg = (left_eye + right_eye) / 2, (mouth_l + mouth_r) / 2
    eye_to_eye, eye_to_mouth = right_eye - left_eye, mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    centre, side = eye_avg + 0.1 * eye_to_mouth, 2 * np.hypot(*x)
    assert np.abs(centre - 256).max() < 4  # measured (0.1, 2.8) px off
    assert abs(side / 512 - 1) < 0.02  # measured 503.7 px
    assert abs(np.degrees(np.arctan2(x[1], x[0]))) < 0.5  # upright: measured -0.2 degrees


@pytest.mark.parametrize("face_size", [512, 32, 100])
def test_estimate_alignment_recovers_known_similarity(face_size):
    template = face_template(face_size).astype(np.float64)
    truth = _similarity(-0.7, face_size / 300.0, 5.0, 9.0)  # image -> template
    image_points = apply_affine(invert_affine(truth), template)
    fitted = estimate_alignment(image_points, face_size)
    assert fitted.shape == (2, 3) and fitted.dtype == np.float64
    np.testing.assert_allclose(fitted, truth, atol=1e-9)


def test_similarity_transform_rejects_reflection_and_degenerate_input():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    mirrored = src * np.array([-1.0, 1.0])
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0  # a proper rotation, never a reflection
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), src[:1].repeat(5, 0))
    with pytest.raises(ValueError, match="NaN"):
        estimate_alignment(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        estimate_alignment(np.zeros((4, 2)))


def test_least_squares_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    truth = _similarity(0.1, 2.0, 30.0, 10.0)
    image_points = apply_affine(invert_affine(truth), face_template(512))
    noisy = image_points + rng.normal(0, 0.5, image_points.shape)
    fitted = estimate_alignment(noisy, 512)
    assert np.abs(apply_affine(fitted, noisy) - face_template(512)).max() < 3.0


def test_invert_affine_round_trip():
    m = _similarity(1.1, 0.5, -3.0, 7.0)
    points = np.random.default_rng(1).uniform(-100, 100, (10, 2))
    np.testing.assert_allclose(apply_affine(invert_affine(m), apply_affine(m, points)), points, atol=1e-9)
    np.testing.assert_allclose(invert_affine(invert_affine(m)), m, atol=1e-12)


def test_warp_then_inverse_warp_round_trips_template_points():
    """Mark the landmarks in an image, warp to the crop: the marks land on the template;
    warp the crop back: they return to where they were."""
    size, face_size = 200, 64
    landmarks = np.array([[70.0, 80.0], [125.0, 85.0], [96.0, 115.0], [75.0, 140.0], [120.0, 144.0]])
    affine = estimate_alignment(landmarks, face_size)
    template = face_template(face_size)
    # the template points mapped back give the fitted landmark positions (close to the input ones)
    back = apply_affine(invert_affine(affine), template)
    assert np.abs(back - landmarks).max() < 6.0
    image = np.zeros((size, size, 3), np.uint8)
    for x, y in back:
        cv2.circle(image, (round(x), round(y)), 3, (255, 255, 255), -1)
    crop = warp_face(image, affine, face_size)
    assert crop.shape == (face_size, face_size, 3) and crop.dtype == np.uint8
    for x, y in template:
        assert crop[round(y), round(x)].max() > 100
    restored = cv2.warpAffine(crop, invert_affine(affine), (size, size))
    for x, y in back:
        assert restored[round(y), round(x)].max() > 100


def test_warp_face_border_reflects_instead_of_black():
    image = np.full((50, 50, 3), 200, np.uint8)
    affine = np.array([[1.0, 0.0, 30.0], [0.0, 1.0, 30.0]])  # crop reaches far outside the image
    crop = warp_face(image, affine, 64)
    assert crop.min() == 200
    with pytest.raises(ValueError):
        warp_face(np.zeros((10, 10), np.uint8), affine, 8)


@pytest.mark.parametrize("factor", [2, 3, 1.5])
def test_rescale_affine_matches_crop_from_resized_image(factor):
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (0, 0), 4)
    landmarks = np.array([[60.0, 50.0], [95.0, 52.0], [78.0, 70.0], [63.0, 88.0], [92.0, 89.0]])
    affine = estimate_alignment(landmarks, 64)
    big = cv2.resize(image, (round(160 * factor), round(120 * factor)), interpolation=cv2.INTER_CUBIC)
    small_crop = warp_face(image, affine, 64).astype(float)
    big_crop = warp_face(big, rescale_affine(affine, factor), 64).astype(float)
    assert np.abs(small_crop - big_crop)[8:-8, 8:-8].mean() < 2.0

"""Paste-back: soft mask, locality, identity faces, sizes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from codeformer_lightning.inference.align import estimate_alignment, warp_face
from codeformer_lightning.inference.paste import face_mask, paste_back

LANDMARKS = np.array([[70.0, 80.0], [125.0, 85.0], [96.0, 115.0], [75.0, 140.0], [120.0, 144.0]])


def _photo(height: int = 240, width: int = 320) -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 3)


def _footprint(affine: np.ndarray, face_size: int, shape: tuple[int, int]) -> np.ndarray:
    from codeformer_lightning.inference.align import invert_affine

    square = np.ones((face_size, face_size), np.uint8)
    return cv2.warpAffine(square, invert_affine(affine), (shape[1], shape[0]), flags=cv2.INTER_NEAREST) > 0


def test_identity_face_changes_image_only_near_the_face():
    image = _photo()
    affine = estimate_alignment(LANDMARKS, 128)
    crop = warp_face(image, affine, 128)
    pasted = paste_back(image, [crop], [affine])
    assert pasted.shape == image.shape and pasted.dtype == np.uint8
    assert pasted is not image
    diff = np.abs(pasted.astype(int) - image.astype(int)).max(axis=2)
    near = cv2.dilate(_footprint(affine, 128, image.shape[:2]).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert diff[~near].max() == 0  # untouched outside the face's crop
    assert diff[near].mean() < 6  # re-warping an unchanged face only blurs it slightly


def test_changed_face_is_blended_softly():
    image = _photo()
    affine = estimate_alignment(LANDMARKS, 64)
    white = np.full((64, 64, 3), 255, np.uint8)
    pasted = paste_back(image, [white], [affine], feather=4)
    centre = LANDMARKS.mean(0).round().astype(int)
    assert (pasted[centre[1], centre[0]] == 255).all()  # fully replaced in the middle
    assert (pasted[-5, -5] == image[-5, -5]).all()  # untouched far away (crop spans x < 215)
    mask, (x0, y0, x1, y1) = face_mask(affine, 64, image.shape[:2], feather=4)
    assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 100  # a real ramp, not a hard edge
    assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]


def test_paste_back_handles_faces_outside_or_across_the_border():
    image = _photo(100, 100)
    face = np.zeros((32, 32, 3), np.uint8)
    outside = np.array([[1.0, 0.0, 500.0], [0.0, 1.0, 500.0]])  # crop far beyond the image
    assert (paste_back(image, [face], [outside]) == image).all()
    across = np.array([[0.5, 0.0, 16.0], [0.0, 0.5, 16.0]])  # face centred on the top-left corner
    result = paste_back(image, [face], [across])
    assert result.shape == image.shape and (result[0, 0] < image[0, 0]).all()


def test_paste_back_validates_input():
    image = _photo(50, 50)
    with pytest.raises(ValueError, match="affines"):
        paste_back(image, [np.zeros((8, 8, 3), np.uint8)], [])
    with pytest.raises(ValueError, match="uint8"):
        paste_back(image.astype(np.float32), [], [])
    assert (paste_back(image, [], []) == image).all()

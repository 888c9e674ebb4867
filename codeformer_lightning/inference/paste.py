"""Paste restored, aligned faces back into the whole photo (CPU reference path)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from codeformer_lightning.inference.align import apply_affine, invert_affine


def default_feather(face_size_in_image: float) -> int:
    """Feather width in pixels for a face about ``face_size_in_image`` px wide: ~5% of it, >= 1.

    Wide enough to hide the seam between the restored face and the untouched background, narrow
    enough that most of the face is fully restored.
    """
    return max(1, int(face_size_in_image) // 20)


def _roi(inverse: np.ndarray, face_size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Image rectangle ``(x0, y0, x1, y1)`` covered by the crop's footprint, clipped; None if outside."""
    corners = np.array([[0, 0], [face_size, 0], [0, face_size], [face_size, face_size]], dtype=np.float64)
    pts = apply_affine(inverse, corners)
    x0, y0 = np.floor(pts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def face_mask(affine: np.ndarray, face_size: int, image_shape: tuple[int, int], feather: int | None = None
              ) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Soft blending mask of one face in image space, cut to its bounding rectangle.

    Returns ``(mask (h, w) float32 in [0, 1], (x0, y0, x1, y1))`` or None when the face lies
    outside the image. The warped crop square is eroded (its interpolated rim is not trustworthy),
    eroded again by ``feather`` and Gaussian-blurred by ``feather``, so the mask reaches 1 well
    inside the face and falls to 0 before the crop border.
    """
    height, width = image_shape
    inverse = invert_affine(affine)
    roi = _roi(inverse, face_size, height, width)
    if roi is None:
        return None
    x0, y0, x1, y1 = roi
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    square = np.ones((face_size, face_size), dtype=np.float32)
    mask = cv2.warpAffine(square, local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    scale = float(np.sqrt(abs(np.linalg.det(inverse[:, :2]))))  # image px per crop px
    rim = max(2, int(round(2 * scale)))
    mask = cv2.erode(mask, np.ones((rim, rim), np.uint8))
    if feather is None:
        feather = default_feather(face_size * scale)
    if feather > 0:
        mask = cv2.erode(mask, np.ones((2 * feather + 1, 2 * feather + 1), np.uint8))
        mask = cv2.GaussianBlur(mask, (4 * feather + 1, 4 * feather + 1), 0)
    return np.clip(mask, 0.0, 1.0), roi


def paste_back(
    image: np.ndarray,
    faces: Sequence[np.ndarray],
    affines: Sequence[np.ndarray],
    feather: int | None = None,
) -> np.ndarray:
    """Blend restored aligned faces into ``image``; returns a new ``(H, W, 3)`` uint8 image.

    ``image``: ``(H, W, 3)`` uint8; ``faces[i]``: ``(S, S, 3)`` uint8, the restored crop that
    ``affines[i]`` (``(2, 3)``, image -> crop) cut out. Each face is warped back with the inverse
    alignment (bilinear) and alpha-blended through :func:`face_mask`; later faces are blended over
    earlier ones. ``feather``: blend width in image pixels (default ~5% of the face's width).
    Only the faces' rectangles are touched, which keeps huge photos cheap.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if len(faces) != len(affines):
        raise ValueError(f"got {len(faces)} faces but {len(affines)} affines")
    result = image.copy()
    height, width = image.shape[:2]
    for face, affine in zip(faces, affines):
        if face.ndim != 3 or face.shape[0] != face.shape[1] or face.shape[2] != 3:
            raise ValueError(f"faces must be (S, S, 3), got {face.shape}")
        face_size = face.shape[0]
        masked = face_mask(affine, face_size, (height, width), feather)
        if masked is None:
            continue
        mask, (x0, y0, x1, y1) = masked
        local = invert_affine(affine)
        local[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(face, local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
        alpha = mask[..., None]
        region = result[y0:y1, x0:x1].astype(np.float32)
        blended = alpha * warped.astype(np.float32) + (1.0 - alpha) * region
        result[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result

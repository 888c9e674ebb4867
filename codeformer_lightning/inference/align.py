"""Five-point face alignment to the FFHQ template.

Landmark order everywhere in this package: left eye, right eye, nose tip, left mouth corner, right
mouth corner, "left" meaning the image's left (the viewer's), points in ``(x, y)`` pixel coordinates.
An *affine* is a ``(2, 3)`` float64 matrix ``m`` mapping an image point ``p`` to the aligned crop
as ``m[:, :2] @ p + m[:, 2]`` (the convention of ``cv2.warpAffine``).
"""

from __future__ import annotations

import cv2
import numpy as np

# The FFHQ 5-point template at 512 px used by the published CodeFormer (through facexlib).
FFHQ_TEMPLATE_512: np.ndarray = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)


def face_template(face_size: int = 512) -> np.ndarray:
    """The FFHQ template scaled to a ``face_size`` square crop: ``(5, 2)`` float32 ``(x, y)``."""
    if face_size <= 0:
        raise ValueError(f"face_size must be positive, got {face_size}")
    return (FFHQ_TEMPLATE_512 * (face_size / 512.0)).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``(2, 3)`` float64 mapping ``src`` ``(N,2)`` onto ``dst`` ``(N,2)``.

    Umeyama (1991): rotation, uniform scale and translation; the SVD sign correction rules out
    reflections, so a mirrored point set is fitted by the best proper rotation instead.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (N,2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or infinite values")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var < 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = dst_c.T @ src_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / src_var
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def estimate_alignment(landmarks: np.ndarray, face_size: int = 512) -> np.ndarray:
    """Similarity ``(2, 3)`` float64 taking image ``landmarks`` ``(5, 2)`` to the template at ``face_size``."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    return similarity_transform(landmarks, face_template(face_size))


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine as ``(2, 3)`` float64 (crop -> image for an alignment)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"affine must have shape (2, 3), got {m.shape}")
    linear_inv = np.linalg.inv(m[:, :2])
    return np.concatenate([linear_inv, -linear_inv @ m[:, 2:]], axis=1)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` points through a ``(2, 3)`` affine; returns ``(N, 2)`` float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(m, dtype=np.float64)[:, :2].T + np.asarray(m, dtype=np.float64)[:, 2]


def warp_face(image: np.ndarray, affine: np.ndarray, face_size: int = 512) -> np.ndarray:
    """Cut the aligned face ``(S, S, 3)`` uint8 out of ``image`` ``(H, W, 3)`` uint8.

    Bilinear ``cv2.warpAffine``. Parts of the crop falling outside the image are filled by
    reflecting the image at its border (``BORDER_REFLECT_101``) rather than with a constant colour,
    as faces cut by the frame then look like faces to the network rather than ending in a hard
    grey edge; :func:`~codeformer_lightning.inference.paste.paste_back` only writes inside the image,
    so the reflected parts never reach the result.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return cv2.warpAffine(
        image, np.asarray(affine, dtype=np.float64), (face_size, face_size),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101,
    )


def rescale_affine(m: np.ndarray, factor: float) -> np.ndarray:
    """The alignment ``(2, 3)`` for the same face in the image resized by ``factor``.

    Uses the pixel-centre convention of ``cv2.resize`` (image pixel ``p`` lands at
    ``factor * (p + 0.5) - 0.5``), so the crop cut from the resized image matches the original one.
    """
    m = np.asarray(m, dtype=np.float64)
    linear = m[:, :2] / factor
    shift = 0.5 * (factor - 1.0)
    return np.concatenate([linear, (m[:, 2] - linear @ np.array([shift, shift]))[:, None]], axis=1)

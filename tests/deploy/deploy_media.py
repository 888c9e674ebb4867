"""Synthetic images and face placements shared by the deployment tests (imported by name)."""

from __future__ import annotations

import cv2
import numpy as np

from codeformer_lightning.inference.align import face_template

H, W = 120, 160


def textured_image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    """Smooth colour blobs plus pixel noise: both low and high frequencies, ``(H, W, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8), (width, height),
                     interpolation=cv2.INTER_CUBIC)
    return np.clip(low.astype(int) + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)


def placed_landmarks(cx: float, cy: float, scale: float, angle: float, face_size: int = 64) -> np.ndarray:
    """Template landmarks rotated by ``angle``, scaled and centred at ``(cx, cy)``: ``(5, 2)``."""
    t = face_template(face_size).astype(np.float64)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (t - t.mean(0)) @ rot.T * scale + (cx, cy)



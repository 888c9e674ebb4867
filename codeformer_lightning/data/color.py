"""Colour changes of degraded inputs: per-channel shift, grayscale and a torchvision-style jitter.

The published colorization data (``CodeFormer_colorization.yml`` with its dataset code) changes the
colours of the degraded input, never of the target: a random per-channel shift, a conversion to
grayscale, and torchvision's ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation`` /
``adjust_hue`` applied in a random order. They are written here in numpy / OpenCV (torchvision is
not a run-time dependency) and agree with torchvision's tensor functions to float32 rounding
(``tests/data/test_degradations.py`` compares them).

Every function takes and returns ``(H, W, 3) float32`` RGB in grey levels, 0..255, unrounded: the
published pipeline works on unrounded floats and rounds once at the end, and so does
:func:`~codeformer_lightning.data.degradations.apply_degradation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

#: The jitter operations, in the numbering of the published ``color_jitter_pt`` (its ``randperm(4)``
#: draws an order of these indices).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
#: torchvision's luma weights for float tensors (``rgb_to_grayscale``); the grayscale conversion of
#: the published pipeline (OpenCV's ``COLOR_BGR2GRAY``) uses 0.299 / 0.587 / 0.114 instead.
_TORCHVISION_LUMA = np.array([0.2989, 0.587, 0.114], np.float32)
_WHITE = 255.0


def shift_channels(image: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """Add ``shift`` ``(3,)`` grey levels to the R, G, B channels and clip to [0, 255]."""
    return np.clip(image + np.asarray(shift, np.float32), 0.0, _WHITE)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` (OpenCV's weights) repeated in three channels."""
    gray = cv2.cvtColor(np.ascontiguousarray(image, np.float32), cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _torchvision_gray(image: np.ndarray) -> np.ndarray:
    """``(H, W, 1)`` luma with torchvision's float weights."""
    return (image @ _TORCHVISION_LUMA)[:, :, None]


def _blend(image: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    """``ratio * image + (1 - ratio) * other`` clipped to [0, 255] (torchvision's ``_blend``)."""
    return np.clip(ratio * image + (1.0 - ratio) * other, 0.0, _WHITE).astype(np.float32)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale every value by ``factor`` >= 0 (torchvision ``adjust_brightness``)."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean luma (torchvision ``adjust_contrast``); 0 gives a flat grey."""
    return _blend(image, float(_torchvision_gray(image).mean(dtype=np.float64)), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the per-pixel luma (torchvision ``adjust_saturation``); 0 gives grayscale."""
    return _blend(image, _torchvision_gray(image), factor)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the hue by ``factor`` turns, ``factor`` in [-0.5, 0.5] (torchvision ``adjust_hue``).

    OpenCV's float RGB <-> HSV conversion uses the same hexcone formulas and tie-breaking as
    torchvision's ``_rgb2hsv`` / ``_hsv2rgb`` (hue in degrees instead of turns).
    """
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must lie in [-0.5, 0.5], got {factor}")
    hsv = cv2.cvtColor(np.ascontiguousarray(image, np.float32), cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = np.mod(hsv[:, :, 0] + 360.0 * factor, 360.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


_ADJUST = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}


def color_jitter(image: np.ndarray, order: Sequence[int], factors: Mapping[str, float]) -> np.ndarray:
    """The published ``color_jitter_pt``: the operations of :data:`JITTER_OPS` in ``order`` (a
    permutation of 0..3), each with its drawn factor from ``factors`` (keyed by name)."""
    for index in order:
        name = JITTER_OPS[int(index)]
        image = _ADJUST[name](image, float(factors[name]))
    return image

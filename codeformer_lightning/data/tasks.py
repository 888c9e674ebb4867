"""Inputs of the task variants beyond plain restoration: inpainting (published) and grayscale (extra).

* ``inpainting``: the published free-form brush strokes (``brush_stroke_mask`` of the published
  data code, used by ``CodeFormer_inpainting.yml``), painted white over the face.
* ``grayscale``: every input converted to grayscale, then (with probability ``cast_prob``) given a
  random colour cast, as faded or tinted old photos. Beyond the published recipe, whose
  colorization data is the ``colorization`` degradation preset (a colour-changed input, grayscale
  only 1% of the time); this variant trains on black-and-white inputs only.

Images are ``(H, W, 3) uint8 RGB``; every random choice comes from the ``numpy.random.Generator``
passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from . import color


@dataclass(frozen=True)
class BrushStrokes:
    """The published brush strokes (training setting), defined at ``reference_size`` px.

    Per mask ``strokes`` polylines (inclusive range); each has ``vertices`` segments (inclusive),
    a width drawn as ``int(uniform(*width))``, round joints, and segments of length
    ``N(r, floor(r0 / 2))`` clipped to ``[0, 2 r]`` with ``r`` = the image diagonal / 8 (``r0`` at
    the reference size: 45 px at 512). Segment directions alternate around ``mean_angle``: even
    segments point at ``2 pi - a``, odd ones at ``a``, with ``a`` uniform in
    ``[mean_angle - u1, mean_angle + u2]``, ``u1, u2`` uniform in ``[0, angle_range]`` per stroke.
    Other image sizes scale widths and the length spread with the diagonal, so a mask covers the
    same fraction of any image.
    """

    strokes: tuple[int, int] = (1, 3)
    vertices: tuple[int, int] = (8, 27)
    width: tuple[float, float] = (30.0, 70.0)
    mean_angle: float = 2 * math.pi / 5
    angle_range: float = 2 * math.pi / 12
    reference_size: int = 512


PUBLISHED_STROKES = BrushStrokes()


def brush_stroke_mask(
    height: int, width: int, rng: np.random.Generator, strokes: BrushStrokes = PUBLISHED_STROKES
) -> np.ndarray:
    """A free-form brush-stroke mask: ``(height, width) bool``, True where painted."""
    diagonal = math.hypot(height, width)
    scale = diagonal / (strokes.reference_size * math.sqrt(2))
    radius = diagonal / 8
    radius_std = math.floor(strokes.reference_size * math.sqrt(2) / 8 / 2) * scale
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(strokes.strokes[0], strokes.strokes[1] + 1))):
        vertices = _stroke_vertices(height, width, rng, strokes, radius, radius_std)
        thickness = max(1, int(rng.uniform(*strokes.width) * scale))
        cv2.polylines(mask, [vertices], False, 1, thickness=thickness)
        for x, y in vertices:  # round joints
            cv2.circle(mask, (int(x), int(y)), thickness // 2, 1, thickness=-1)
    return mask.astype(bool)


def _stroke_vertices(
    height: int, width: int, rng: np.random.Generator, strokes: BrushStrokes, radius: float, radius_std: float
) -> np.ndarray:
    """``(n + 1, 2) int32`` (x, y) vertices of one stroke, truncated to whole pixels as published."""
    count = int(rng.integers(strokes.vertices[0], strokes.vertices[1] + 1))
    low = strokes.mean_angle - rng.uniform(0, strokes.angle_range)
    high = strokes.mean_angle + rng.uniform(0, strokes.angle_range)
    angles = rng.uniform(low, high, count)
    angles[0::2] = 2 * math.pi - angles[0::2]  # alternate: the stroke zig-zags along a direction
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    points = [(x, y)]
    for angle in angles:
        step = float(np.clip(rng.normal(radius, radius_std), 0, 2 * radius))
        x = int(np.clip(x + step * math.cos(angle), 0, width))
        y = int(np.clip(y + step * math.sin(angle), 0, height))
        points.append((x, y))
    return np.array(points, np.int32)


def inpainting_input(
    image: np.ndarray, rng: np.random.Generator, strokes: BrushStrokes = PUBLISHED_STROKES
) -> tuple[np.ndarray, np.ndarray]:
    """Published inpainting input: ``(H, W, 3) uint8`` with brush strokes painted white.

    Returns ``(lq (H, W, 3) uint8, mask (H, W) bool)``, mask True where painted.
    """
    mask = brush_stroke_mask(image.shape[0], image.shape[1], rng, strokes)
    out = image.copy()
    out[mask] = 255
    return out, mask


def grayscale_input(
    image: np.ndarray, rng: np.random.Generator, cast_prob: float = 0.5, cast_shift: float = 20.0
) -> np.ndarray:
    """Grayscale input (extra): ``(H, W, 3) uint8`` -> its luma in three channels, then with
    ``cast_prob`` a per-channel colour cast of up to ``cast_shift`` grey levels."""
    gray = np.rint(color.to_gray(image.astype(np.float32)))
    if rng.random() < cast_prob:
        # whole grey levels: a cast moves every pixel of a channel by the same amount
        gray = color.shift_channels(gray, np.rint(rng.uniform(-cast_shift, cast_shift, size=3)))
    return np.clip(gray, 0, 255).astype(np.uint8)


#: What the dataset does to the degraded input beyond the degradation preset.
TASKS = ("restoration", "inpainting", "grayscale")


def check_task(task: str) -> None:
    """Raise ValueError naming the valid tasks (and the replacement of the former ``colorization``)."""
    if task == "colorization":
        raise ValueError(
            "task 'colorization' was replaced: the published colorization data is task 'restoration' with "
            "degradation 'colorization' (experiment=colorization sets both); task 'grayscale' makes every input "
            "grayscale"
        )
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")

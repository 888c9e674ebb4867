"""Fixtures of the data tests: small folders of synthetic face-like images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image


def smooth_image(size: int, seed: int) -> np.ndarray:
    """``(size, size, 3) uint8``: smooth random colours with some edges (JPEG and blur have work to do)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((size // 4 + 1, size // 4 + 1, 3)).astype(np.float32)
    img = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    img[size // 3 : size // 2, :, :] = rng.random(3)  # a hard edge band
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_folder(root: Path, count: int, size: int, prefix: str = "face") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{prefix}_{i:03d}"
        Image.fromarray(smooth_image(size, i)).save(root / f"{name}.png")
        names.append(name)
    return names


@pytest.fixture
def face_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """8 good 32-px PNG faces."""
    folder = tmp_path / "faces"
    return folder, write_folder(folder, 8, 32)

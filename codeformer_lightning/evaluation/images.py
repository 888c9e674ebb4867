"""Reading image folders for evaluation and pairing restored images with their ground truth.

Images are returned as ``(H, W, 3) uint8 RGB`` numpy arrays, read as ``codeformer-restore`` reads them
(grayscale, palette, RGBA and 16-bit files converted); unreadable files raise
:class:`ImageReadError` naming the file, so a batch job can record it and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.io import ImageReadError as InferenceReadError
from ..inference.io import read_image as inference_read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Images smaller than this on a side cannot hold a face worth measuring (SSIM's window is 11 px).
MIN_SIDE = 11


class ImageReadError(ValueError):
    """An image file could not be used; the message names the file and why."""


class PairingError(ValueError):
    """Restored and ground-truth folders do not hold the same image names."""


def list_images(folder: str | Path) -> dict[str, Path]:
    """``{stem: path}`` of the image files directly in ``folder`` (sorted by stem).

    Raises FileNotFoundError when ``folder`` is not a directory, PairingError when two files share
    a stem (``a.png`` and ``a.jpg``: which one is meant is ambiguous).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise PairingError(
                    f"{folder}: two images named {path.stem!r}: {found[path.stem].name}, {path.name}"
                )
            found[path.stem] = path
    return found


def pair_folders(restored: str | Path, gt: str | Path) -> list[tuple[str, Path, Path]]:
    """Match ``restored`` and ``gt`` images by file stem -> ``[(stem, restored_path, gt_path)]``.

    Raises PairingError listing every unmatched name on either side (so a typo in one file name is
    found at once, not after an hour of evaluation), or when no images are found.
    """
    rest, truth = list_images(restored), list_images(gt)
    only_rest = sorted(set(rest) - set(truth))
    only_gt = sorted(set(truth) - set(rest))
    if only_rest or only_gt:
        lines = [f"restored folder {restored} and ground-truth folder {gt} do not match by file name:"]
        if only_rest:
            lines.append(f"  only in restored ({len(only_rest)}): {', '.join(only_rest)}")
        if only_gt:
            lines.append(f"  only in ground truth ({len(only_gt)}): {', '.join(only_gt)}")
        raise PairingError("\n".join(lines))
    if not rest:
        raise PairingError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {restored} or {gt}")
    return [(stem, rest[stem], truth[stem]) for stem in sorted(rest)]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file -> ``(H, W, 3) uint8 RGB`` with the restoration command's reader
    (:func:`codeformer_lightning.inference.io.read_image`: EXIF orientation, 16-bit, grayscale, alpha
    composited on white). Raises ImageReadError (naming the file) for missing, corrupt or truncated
    files and for images too small to evaluate.
    """
    try:
        arr = inference_read_image(path)
    except InferenceReadError as exc:
        raise ImageReadError(str(exc)) from exc
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ImageReadError(
            f"{path}: {arr.shape[1]}x{arr.shape[0]} is too small to evaluate (min side {MIN_SIDE} px)"
        )
    return arr


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8 RGB`` -> ``(1, 3, H, W) float32`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3) uint8 RGB`` (rounded, clipped)."""
    return (image.detach().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, *size)``, bicubic with antialiasing, clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


@dataclass
class ImagePair:
    """One restored/ground-truth pair, both ``(1, 3, H, W) float32`` in [0, 1] of the same size."""

    name: str
    restored: torch.Tensor
    gt: torch.Tensor

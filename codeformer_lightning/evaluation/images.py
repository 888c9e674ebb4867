"""Image folders for evaluation: pairing restored images with their ground truth, and loading them.

Pixels come from :func:`codeformer_lightning.io.read_image`, the reader that training and
``codeformer-restore`` use (EXIF orientation, 16-bit, grayscale, alpha composited on white).
Unreadable or unusable files raise :class:`~codeformer_lightning.io.BadImageError` naming the file,
so a batch job can record it and go on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import IMAGE_EXTENSIONS, BadImageError, image_files_in, read_image

#: Images smaller than this on a side cannot hold a face worth measuring (SSIM's window is 11 px).
MIN_SIDE = 11


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
    for path in image_files_in(folder, recursive=False):
        if path.stem in found:
            raise PairingError(
                f"{folder}: two images named {path.stem!r}: {found[path.stem].name}, {path.name}"
            )
        found[path.stem] = path
    return dict(sorted(found.items()))


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
        raise PairingError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {restored} or {gt}")
    return [(stem, rest[stem], truth[stem]) for stem in sorted(rest)]


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file for the metrics -> ``(1, 3, H, W) float32`` in [0, 1].

    Raises :class:`~codeformer_lightning.io.BadImageError` naming the file for missing, corrupt or
    truncated files and for images too small to evaluate (a side under :data:`MIN_SIDE` px).
    """
    image = read_image(path)
    if min(image.shape[:2]) < MIN_SIDE:
        raise BadImageError(
            path, f"{image.shape[1]}x{image.shape[0]} px is too small to evaluate (min side {MIN_SIDE} px)"
        )
    return to_tensor(image)


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

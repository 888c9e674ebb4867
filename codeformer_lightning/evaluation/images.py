"""Image folders for evaluation: pairing restored images with their ground truth, and loading them.

Pixels come from :func:`codeformer_lightning.io.read_image`, the reader that training and
``codeformer-restore`` use (EXIF orientation, 16-bit, grayscale, alpha composited on white).
Unreadable or unusable files raise :class:`~codeformer_lightning.io.BadImageError` naming the file,
so a batch job can record it and go on.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import IMAGE_EXTENSIONS, BadImageError, image_files_in, read_image

#: Images smaller than this on a side cannot hold a face worth measuring (SSIM's window is 11 px).
MIN_SIDE = 11
#: ``codeformer-restore``'s folder of one result per input (the whole photo, or the face with --aligned)
RESTORE_RESULTS = "final_results"
#: the fidelity tag ``codeformer-restore`` puts before the suffix when it restores at several w
_W_TAG = re.compile(r"(?P<name>.+)_w(?P<w>\d+(?:\.\d+)?)")


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


def restored_runs(
    restored: str | Path, gt: str | Path, suffix: str = ""
) -> list[tuple[float | None, list[tuple[str, Path, Path]]]]:
    """Pair restored images with their ground truth, one run per fidelity weight w:
    ``[(w or None, [(stem, restored_path, gt_path), ...]), ...]`` (w ascending).

    ``restored``: a folder of images named as the ground truth (one run, w unknown), or
    ``codeformer-restore``'s output (its folder or the ``final_results/`` in it), whose names carry
    ``_w0.50`` when it restored at several w (one run per w). ``suffix``: restore's ``--suffix``,
    removed from the names. Raises PairingError naming the images that match nothing.
    """
    folder = Path(restored)
    if (folder / RESTORE_RESULTS).is_dir():
        folder = folder / RESTORE_RESULTS
    found, truth = list_images(folder), list_images(gt)
    names = {
        stem.removesuffix(suffix) if suffix and stem.endswith(suffix) else stem: path
        for stem, path in found.items()
    }
    if set(names) == set(truth) and names:
        return [(None, [(stem, names[stem], truth[stem]) for stem in sorted(names)])]
    tags = {stem: _W_TAG.fullmatch(stem) for stem in names}
    if not names or not all(m and m.group("name") in truth for m in tags.values()):
        try:
            pair_folders(folder, gt)  # the plain comparison's error lists every unmatched name
        except PairingError as exc:
            raise PairingError(
                f"{exc}\n(codeformer-restore names its results <name>_w0.50<suffix>.png when run at several w: "
                "give its output folder or final_results/, and --suffix if it was run with one)"
            ) from None
        raise PairingError(f"{folder}: names with and without a w tag are mixed")
    runs: dict[float, dict[str, Path]] = {}
    for stem, match in tags.items():
        runs.setdefault(float(match.group("w")), {})[match.group("name")] = names[stem]
    missing = [
        f"w={w:g}: {', '.join(sorted(set(truth) - set(run)))}"
        for w, run in sorted(runs.items())
        if set(run) != set(truth)
    ]
    if missing:
        raise PairingError(
            f"{folder}: not every ground-truth image was restored at every w; missing " + "; ".join(missing)
        )
    return [(w, [(stem, run[stem], truth[stem]) for stem in sorted(run)]) for w, run in sorted(runs.items())]


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

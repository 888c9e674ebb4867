"""Face datasets: clean aligned faces from a folder (or LMDB) paired with synthetic degraded inputs.

A dataset is an image *source* (names + encoded bytes: :class:`ImageFolderSource`, or
:class:`~codeformer_lightning.data.lmdb.LmdbSource`) wrapped by :class:`FaceDataset`, which
decodes, checks, flips, degrades and returns sample dicts.

Seeding scheme: sample ``i`` of a training epoch ``e`` draws every random choice (flip, blur,
factor, noise, JPEG, jitter, masks) from ``numpy.random.default_rng([seed, 0, e, i])``; a fixed
(validation) dataset uses ``[seed, 1, i]`` regardless of the epoch. So a pair depends only on
(seed, epoch, index): identical for identical seeds whatever the number of workers or processes,
different for different indices, and different from one epoch to the next. Worker ids play no
part: every index is drawn by exactly one worker of one rank per epoch, so workers never repeat
each other's pairs. The epoch lives in a shared-memory tensor, so ``set_epoch`` in the main
process reaches persistent workers. The training loader's sampler
(:class:`~codeformer_lightning.data.loaders.ResumableSampler`) calls it whenever its own epoch
changes, before that epoch's iterator exists: also when a resumed run restores a mid-epoch
position before its first batch.

Bad files never crash a run: a file that fails to decode is reported once (a
:class:`BadImageWarning` naming the file and the reason; raised in the main process also when a
loader worker met it, see :class:`~codeformer_lightning.data.loaders.ReportingLoader`), marked in a shared-memory flag tensor
(``skipped_names()`` in the main process sees the marks of all workers) and replaced by the next
good image (cyclically; deterministic). Pixels come from the package's one decoder,
:func:`codeformer_lightning.io.decode_image` (EXIF orientation, 16-bit rounding, palette, alpha
composited on white), so training sees what inference and evaluation see for the same file; images
of the wrong size are resized (bicubic / area, with one warning per file) or, with
``on_wrong_size="error"``, rejected like unreadable files (warning, skipped, replaced).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import IMAGE_EXTENSIONS, BadImageError, decode_image, image_files_in, read_image
from .degradations import DegradationConfig, degrade, preset
from .tasks import TASKS as TASKS  # re-exported: the valid values of `task`
from .tasks import check_task, grayscale_input, inpainting_input

WRONG_SIZE_POLICIES = ("resize", "error")
#: the sub-stream of the seed: training samples vary with the epoch, fixed samples do not
_TRAIN_STREAM, _FIXED_STREAM = 0, 1


class BadImageWarning(UserWarning):
    """A training image could not be used (it is skipped) or was converted / resized."""


class ImageSource(Protocol):
    """Names and encoded bytes of images; indexable, picklable, opened lazily in each process."""

    names: list[str]

    def __len__(self) -> int: ...

    def read_bytes(self, index: int) -> bytes: ...

    def describe(self, index: int) -> str: ...


# ----------------------------------------------------------------------------- decoding
def fit_size(image: np.ndarray, size: int, origin: str, on_wrong_size: str, warned: set[str]) -> np.ndarray:
    """``image`` at ``size x size``: resized (bicubic, area when shrinking) with one warning per
    file, or :class:`BadImageError` when ``on_wrong_size == "error"``."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if on_wrong_size == "error":
        raise BadImageError(origin, f"image is {w}x{h} px, expected {size}x{size} (on_wrong_size='error')")
    if origin not in warned:
        warned.add(origin)
        note = " (not square: aligned faces are square, the face will be stretched)" if h != w else ""
        warnings.warn(
            f"{origin}: image is {w}x{h} px, resized to {size}x{size}{note}", BadImageWarning, stacklevel=2
        )
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def read_face(path: str | os.PathLike, size: int) -> np.ndarray:
    """The face image file ``path`` as :class:`FaceDataset` delivers it before degradation:
    ``(size, size, 3) uint8 RGB``, decoded by :func:`codeformer_lightning.io.read_image` and resized
    like :func:`fit_size` (warning when resized). Raises :class:`BadImageError` naming the file."""
    return fit_size(read_image(path), size, str(path), "resize", set())


# ----------------------------------------------------------------------------- folders
def list_image_files(folder: str | os.PathLike, file_list: str | os.PathLike | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive; extensions of
    :data:`codeformer_lightning.io.IMAGE_EXTENSIONS`, any case), sorted; or the relative paths listed
    in ``file_list`` (one per line, ``#`` comments), in that order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder (it does not exist or is not a folder)")
    if file_list is not None:
        lines = Path(file_list).read_text().splitlines()
        rel = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        paths = [folder / r for r in rel]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{file_list}: {len(missing)} listed files not found under {folder}, e.g. {missing[:3]}"
            )
    else:
        paths = image_files_in(folder)
    if not paths:
        raise FileNotFoundError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


class ImageFolderSource:
    """The image files under a folder (see :func:`list_image_files`); names are file stems."""

    def __init__(self, folder: str | os.PathLike, file_list: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder)
        self.paths = list_image_files(folder, file_list)
        self.names = [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, index: int) -> bytes:
        return self.paths[index].read_bytes()

    def describe(self, index: int) -> str:
        return str(self.paths[index])


# ----------------------------------------------------------------------------- the dataset
def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) float32`` in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


class FaceDataset(Dataset):
    """Clean faces of ``source`` with on-the-fly degraded inputs.

    Each sample is a dict: ``gt`` and ``lq`` ``(3, S, S) float32`` in [-1, 1], ``name`` (file stem),
    ``index`` (the index actually delivered, differs from the requested one when a bad file was
    replaced); ``codes`` ``(L,) long`` when ``latent_codes`` is given ("hflip" entry when the
    sample was flipped); ``lq_large`` with ``paired_small_large`` (a ``large_degradation`` of the
    same flipped face; ``lq`` is then the small one); ``mask`` ``(1, S, S) float`` (1 = painted)
    for inpainting.

    Args:
        source: images (:class:`ImageFolderSource`, ``LmdbSource``).
        image_size: S; other sizes follow ``on_wrong_size``.
        degradation: preset name or :class:`DegradationConfig` (of ``lq``).
        task: ``restoration`` (lq = degraded; the published colorization data is this task with
            the ``colorization`` preset), ``inpainting`` (published white brush strokes over the
            degraded face; degradation ``none`` gives the published clean-but-masked inputs) or
            ``grayscale`` (extra: lq = grayscale of the degraded face, sometimes colour-cast).
        seed: see the module docstring.
        fixed: validation mode: degradations independent of the epoch, no flip.
        use_hflip: flip half the training samples (gt, lq and codes together).
        indices: a subset of the source's indices (e.g. the training split).
    """

    def __init__(
        self,
        source: ImageSource,
        image_size: int,
        degradation: str | DegradationConfig = "stage2",
        task: str = "restoration",
        seed: int = 0,
        fixed: bool = False,
        use_hflip: bool = True,
        latent_codes: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        paired_small_large: bool = False,
        large_degradation: str | DegradationConfig = "stage3_large",
        on_wrong_size: str = "resize",
        indices: Sequence[int] | None = None,
    ) -> None:
        check_task(task)
        if on_wrong_size not in WRONG_SIZE_POLICIES:
            raise ValueError(f"on_wrong_size must be one of {WRONG_SIZE_POLICIES}, got {on_wrong_size!r}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 px, got {image_size}")
        self.source = source
        self.image_size = int(image_size)
        self.degradation = preset(degradation)
        self.large_degradation = preset(large_degradation) if paired_small_large else None
        self.task = task
        self.seed = int(seed)
        self.fixed = fixed
        self.use_hflip = use_hflip and not fixed
        self.on_wrong_size = on_wrong_size
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        if not self.indices:
            raise ValueError("the dataset is empty (no indices selected)")
        self.codes = None
        if latent_codes is not None:
            self.codes = {"orig": latent_codes["orig"], "hflip": latent_codes["hflip"]}
            names = [source.names[i] for i in self.indices]
            missing = [n for n in names if n not in self.codes["orig"] or n not in self.codes["hflip"]]
            if missing:
                raise KeyError(
                    f"{len(missing)} faces have no precomputed codes in the latent-code file (e.g. {missing[:5]}): "
                    "rewrite it with codeformer-latent-codes for this folder"
                )
        # shared memory: written in the main process / any worker, read everywhere
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._bad = torch.zeros(len(self.indices), dtype=torch.bool).share_memory_()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.indices)

    # -- epoch and bookkeeping
    def set_epoch(self, epoch: int) -> None:
        """Training samples of ``epoch`` (visible to running workers too)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def skipped_names(self) -> list[str]:
        """Files found unreadable so far (by any worker), as ``describe`` strings."""
        return [self.source.describe(self.indices[i]) for i in torch.nonzero(self._bad).flatten().tolist()]

    def describe_sample(self, position: int) -> str:
        """The file of sample ``position`` (named when a loader worker dies loading it)."""
        return self.source.describe(self.indices[int(position)])

    def rng(self, position: int) -> np.random.Generator:
        """The generator of sample ``position`` now (see the module docstring)."""
        if self.fixed:
            return np.random.default_rng([self.seed, _FIXED_STREAM, position])
        return np.random.default_rng([self.seed, _TRAIN_STREAM, self.epoch, position])

    # -- loading
    def load_clean(self, position: int) -> np.ndarray:
        """The clean face at ``position``: ``(S, S, 3) uint8 RGB``; :class:`BadImageError` if unusable."""
        index = self.indices[position]
        origin = self.source.describe(index)
        try:
            data = self.source.read_bytes(index)
        except (OSError, KeyError) as exc:
            raise BadImageError(origin, f"cannot read ({exc})") from None
        image = decode_image(data, origin)
        if min(image.shape[:2]) < 2:
            raise BadImageError(origin, f"image is {image.shape[1]}x{image.shape[0]} px, too small to use")
        return fit_size(image, self.image_size, origin, self.on_wrong_size, self._warned)

    def _first_good(self, position: int) -> tuple[int, np.ndarray]:
        n = len(self.indices)
        for step in range(n):
            pos = (position + step) % n
            if self._bad[pos]:
                continue
            try:
                return pos, self.load_clean(pos)
            except BadImageError as exc:
                self._bad[pos] = True
                warnings.warn(
                    f"{exc}; skipped (a good image is used in its place)", BadImageWarning, stacklevel=2
                )
        raise RuntimeError(f"none of the {n} images of the dataset can be decoded (see the warnings above)")

    def __getitem__(self, position: int) -> dict:
        pos, clean = self._first_good(int(position))
        # the requested position seeds the draw: a replacement sample still gets its own degradation
        rng = self.rng(int(position))
        flip = bool(self.use_hflip and rng.random() < 0.5)
        if flip:
            clean = np.ascontiguousarray(clean[:, ::-1])
        name = self.source.names[self.indices[pos]]
        sample: dict = {"name": name, "index": pos}
        lq, _ = degrade(clean, self.degradation, rng)
        if self.large_degradation is not None:
            lq_large, _ = degrade(clean, self.large_degradation, rng)
        if self.task == "grayscale":
            lq = grayscale_input(lq, rng)
            if self.large_degradation is not None:
                lq_large = grayscale_input(lq_large, rng)
        elif self.task == "inpainting":
            lq, mask = inpainting_input(lq, rng)
            sample["mask"] = torch.from_numpy(mask[None].astype(np.float32))
            if self.large_degradation is not None:
                lq_large = np.where(mask[:, :, None], lq, lq_large)
        sample["gt"] = image_to_tensor(clean)
        sample["lq"] = image_to_tensor(lq)
        if self.large_degradation is not None:
            sample["lq_large"] = image_to_tensor(lq_large)
        if self.codes is not None:
            sample["codes"] = self.codes["hflip" if flip else "orig"][name].long()
        return sample

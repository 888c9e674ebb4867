"""What each CodeFormer variant's published inference does, in one place used by every path.

The published weights come in three variants (``load_pretrained`` tells them apart by their
tensors: ``model.variant``), each with its own inference script:

============== ========= ======= ================================================================
task           w         AdaIN   output
============== ========= ======= ================================================================
restoration    as asked  on      the network's image (``inference_codeformer.py``, ``-w`` 0.5)
               (0.5)
colorization   0         on      the network's image, in colour (``inference_colorization.py``)
inpainting     1         off     the network's image only where the mask is set, the input
                                 elsewhere: ``(1 - mask) * input + mask * output``
                                 (``inference_inpainting.py``)
============== ========= ======= ================================================================

The published inpainting mask is the input's **pure-white pixels**: all three channels at 255
(the script's ``sum of the three [-1, 1] channels == 3``). A mask given as a file is a picture of
the same size, white (grey level >= 128) where the network fills in; its pixels are painted white
in the network's input, as the published training data paints its brush strokes, so the network
sees what it was trained on.

The published scripts take aligned 512 x 512 faces only. Here colorization also runs on whole
photos (faces are found on the grey photo, colourised and pasted back; the rest of the photo is
left as it is), while inpainting refuses whole photos with :class:`TaskError`: its masks hide the
eyes, nose and mouth that detection and alignment need. ``FaceRestorer``, ``codeformer-restore``,
``codeformer-restore-video``, ``codeformer-export``, ``codeformer-evaluate`` and the server all
take their settings from :func:`task_for`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from codeformer_lightning.io import BadImageError, image_files_in, read_image

TASKS = ("restoration", "colorization", "inpainting")
#: grey level from which a pixel of a mask file marks a pixel to fill in (white = fill, black = keep)
MASK_THRESHOLD = 128


class TaskError(ValueError):
    """An input the chosen task cannot take (a whole photo for inpainting, a mask of the wrong size
    or with nothing to fill); the message says what to do instead."""


@dataclass(frozen=True)
class Task:
    """One variant's published inference.

    ``w``: its fidelity weight (restoration: the default of ``-w``); ``fixed_w``: the published
    script fixes ``w`` (asking for another is an override, reported by :func:`override_note`);
    ``adain``: the AdaIN re-normalisation of the looked-up codes; ``masked``: only the mask's pixels
    take the network's output; ``whole_photos``: detection and paste-back are supported.
    """

    name: str
    w: float
    fixed_w: bool
    adain: bool
    masked: bool
    whole_photos: bool

    def describe(self) -> str:
        """One line for users: ``inpainting: w=1, AdaIN off, ...``."""
        parts = [f"w={self.w:g}" if self.fixed_w else f"w as given (default {self.w:g})",
                 f"AdaIN {'on' if self.adain else 'off'}"]
        if self.masked:
            parts.append("only the masked pixels (default: the pure-white ones) take the network's output")
        return f"{self.name}: " + ", ".join(parts)


PUBLISHED_TASKS: dict[str, Task] = {
    "restoration": Task("restoration", w=0.5, fixed_w=False, adain=True, masked=False, whole_photos=True),
    "colorization": Task("colorization", w=0.0, fixed_w=True, adain=True, masked=False, whole_photos=True),
    "inpainting": Task("inpainting", w=1.0, fixed_w=True, adain=False, masked=True, whole_photos=False),
}


def task_for(variant: str | None = None, override: str | Task | None = None) -> Task:
    """The task to run: ``override`` when given, else the weights' ``variant`` (``model.variant``).

    Variants that are not a published task (``custom`` sizes, files without a variant) restore.
    """
    if isinstance(override, Task):
        return override
    if override is not None:
        if override not in PUBLISHED_TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {override!r}")
        return PUBLISHED_TASKS[override]
    return PUBLISHED_TASKS.get(variant or "", PUBLISHED_TASKS["restoration"])


def task_of_model(model: object, override: str | Task | None = None) -> Task:
    """:func:`task_for` with the variant ``load_pretrained`` recorded on ``model`` (if any)."""
    return task_for(getattr(model, "variant", None), override)


def override_note(task: Task, ws: Sequence[float], adain: bool | None = None) -> str | None:
    """What a user should know when the asked ``ws`` / ``adain`` differ from ``task``'s published
    inference (None when they do not)."""
    changes = []
    if task.fixed_w and [float(v) for v in ws] != [task.w]:
        changes.append(f"w={', '.join(f'{float(v):g}' for v in ws)} instead of the published w={task.w:g}")
    if adain is not None and adain != task.adain:
        changes.append(f"AdaIN {'on' if adain else 'off'} instead of {'on' if task.adain else 'off'}")
    if not changes:
        return None
    return (f"{task.name} weights: {' and '.join(changes)} as asked (the published {task.name} inference "
            f"uses w={task.w:g} with AdaIN {'on' if task.adain else 'off'})")


def whole_photo_note(task: Task) -> str | None:
    """What happens to whole photos (not just their faces) under ``task``, when users should know."""
    if task.name == "colorization":
        return ("colorization of whole photos: faces are found on the photo as it is, colourised and pasted "
                "back; the rest of the photo is left unchanged (a grey photo stays grey outside the faces)")
    return None


# ----------------------------------------------------------------------------- masks
def white_mask(image: np.ndarray) -> np.ndarray:
    """The published inpainting mask of ``image`` ``(H, W, 3)`` uint8: ``(H, W)`` bool, True where
    all three channels are 255."""
    return np.all(image == 255, axis=-1)


def white_mask_tensor(image: torch.Tensor) -> torch.Tensor:
    """The published rule on network input ``(B, 3, H, W)`` in [-1, 1]: ``(B, 1, H, W)`` bool, True
    where the three channels sum to 3 (all at 1.0, i.e. 255)."""
    return image.sum(dim=1, keepdim=True) == 3


def mask_from_picture(picture: np.ndarray) -> np.ndarray:
    """A mask picture ``(H, W, 3)`` uint8 -> ``(H, W)`` bool: True (fill) where its grey level is at
    least :data:`MASK_THRESHOLD`."""
    return picture.astype(np.float32).mean(axis=-1) >= MASK_THRESHOLD


def checked_mask(mask: np.ndarray, image_shape: tuple[int, ...], origin: str = "mask") -> np.ndarray:
    """``mask`` as ``(H, W)`` bool for an image of ``image_shape``; :class:`TaskError` naming
    ``origin`` when its size differs or it marks no pixel."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (1, 3):
        mask = mask.any(axis=-1) if mask.dtype == bool else mask.max(axis=-1) >= MASK_THRESHOLD
    elif mask.dtype != bool:
        mask = mask >= (0.5 if mask.dtype.kind == "f" else MASK_THRESHOLD)
    if mask.shape != tuple(image_shape[:2]):
        raise TaskError(f"{origin} is {_size(mask.shape)} px but the image is {_size(image_shape)} px; "
                        "a mask must have the image's size (white = fill)")
    if not mask.any():
        raise TaskError(f"{origin} marks no pixel to fill: white (grey level >= {MASK_THRESHOLD}) marks "
                        "the pixels to fill, black the ones to keep")
    return mask


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(size, size)`` bool, nearest neighbour (stays a sharp mask)."""
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def fill_white(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Copy of ``images`` ``(..., H, W, 3)`` uint8 with the ``masks`` ``(..., H, W)`` pixels white:
    the network's inpainting input, as published (holes painted white)."""
    return np.where(masks[..., None], np.uint8(255), images)


def composite(original: np.ndarray, restored: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The published inpainting output: ``restored`` where ``mask`` ``(..., H, W)`` is set,
    ``original`` elsewhere (both ``(..., H, W, 3)``, unchanged there to the bit)."""
    return np.where(mask[..., None], restored, original)


def composite_tensor(original: torch.Tensor, restored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`composite` on ``(B, 3, H, W)`` tensors: ``(1 - mask) * original + mask * restored``
    with ``mask`` ``(B, 1, H, W)`` float in [0, 1] (soft masks blend) or bool."""
    if mask.dtype == torch.bool:
        return torch.where(mask, restored, original)
    mask = mask.to(original.dtype)
    return (1 - mask) * original + mask * restored


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" if len(shape) >= 2 else str(shape)


class MaskSource:
    """Masks given on the command line (``--mask FILE|FOLDER``): one mask file for every input, or
    a folder of masks matched to the inputs by file name (stem: ``face.jpg`` takes ``face.png``).

    :meth:`mask_for` returns the checked ``(H, W)`` bool mask or raises :class:`TaskError` naming
    the files (no mask for this input, unreadable, wrong size, nothing to fill).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.by_stem: dict[str, Path] = {}
        if self.path.is_dir():
            for file in image_files_in(self.path, recursive=False):
                if file.stem in self.by_stem:
                    raise TaskError(f"mask folder {self.path}: two masks named {file.stem!r} "
                                    f"({self.by_stem[file.stem].name}, {file.name})")
                self.by_stem[file.stem] = file
            if not self.by_stem:
                raise TaskError(f"mask folder {self.path} holds no image files")
        elif not self.path.is_file():
            raise TaskError(f"--mask {self.path}: no such file or folder")

    def file_for(self, source: str | Path) -> Path:
        """The mask file of input ``source``; :class:`TaskError` when the folder has none."""
        if not self.path.is_dir():
            return self.path
        stem = Path(source).stem
        if stem not in self.by_stem:
            raise TaskError(f"no mask named {stem}.* in {self.path} for {source}")
        return self.by_stem[stem]

    def mask_for(self, source: str | Path, image_shape: tuple[int, ...]) -> np.ndarray:
        """The checked mask of input ``source`` for an image of ``image_shape``."""
        file = self.file_for(source)
        try:
            picture = read_image(file)
        except BadImageError as exc:
            raise TaskError(f"mask {exc}") from None
        return checked_mask(mask_from_picture(picture), image_shape, f"mask {file} (for {Path(source).name})")

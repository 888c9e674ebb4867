"""Reading a latent-code file: the stage I codes of every training face, precomputed.

The file (written by ``codeformer-latent-codes``, :mod:`codeformer_lightning.models.latent_codes`,
or the published ``latent_gt_code1024.pth``) maps ``{"orig": {name: (L,) long}, "hflip": {name:
(L,) long}}``: ``name`` is the image file's stem, ``L = latent_size**2`` row-major code indices of
the clean face (``orig``) and of its mirror image (``hflip``, since the data pipeline flips at
random). :class:`~codeformer_lightning.data.datasets.FaceDataset` hands them out as ``codes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: the two entries of a latent-code file
CODE_KEYS = ("orig", "hflip")

LatentCodes = dict[str, dict[str, torch.Tensor]]


def read_latent_codes(path: str | os.PathLike) -> LatentCodes:
    """Read a latent-code file (ours or the published one) -> ``{"orig": {...}, "hflip": {...}}``.

    Raises FileNotFoundError for a missing file and ValueError for a file of another layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent-code file {path} not found (write it with codeformer-latent-codes)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not set(CODE_KEYS) <= set(obj):
        keys = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a latent-code file (expected keys 'orig' and 'hflip', found {keys})")
    return obj


def save_latent_codes(codes: LatentCodes, path: str | os.PathLike) -> Path:
    """Write ``codes`` (``{"orig": ..., "hflip": ...}``) in the published layout; returns the path."""
    missing = [key for key in CODE_KEYS if key not in codes]
    if missing:
        raise ValueError(f"latent codes need the entries {CODE_KEYS}, missing {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: codes[key] for key in CODE_KEYS}, path)
    return path

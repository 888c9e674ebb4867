"""Training data: synthetic degradations, face datasets (folder / LMDB) and ``FaceDataModule``.

Images are decoded by :mod:`codeformer_lightning.io` (``decode_image``, ``BadImageError``), the
package's one reader.
"""

from .datamodule import DataEpochCallback, FaceDataModule
from .datasets import BadImageWarning, FaceDataset, ImageFolderSource, list_image_files
from .degradations import (
    PRESETS,
    DegradationConfig,
    DegradationParams,
    apply_degradation,
    degrade,
    preset,
    sample_params,
)
from .lmdb import LmdbSource, pack_lmdb

__all__ = [
    "PRESETS",
    "BadImageWarning",
    "DataEpochCallback",
    "DegradationConfig",
    "DegradationParams",
    "FaceDataModule",
    "FaceDataset",
    "ImageFolderSource",
    "LmdbSource",
    "apply_degradation",
    "degrade",
    "list_image_files",
    "pack_lmdb",
    "preset",
    "sample_params",
]

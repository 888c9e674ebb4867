"""Training data: synthetic degradations, face datasets (folder / LMDB) and ``FaceDataModule``."""

from .datamodule import DataEpochCallback, FaceDataModule
from .datasets import (
    BadImageError,
    BadImageWarning,
    FaceDataset,
    ImageFolderSource,
    decode_image,
    list_image_files,
)
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
    "BadImageError",
    "BadImageWarning",
    "DataEpochCallback",
    "DegradationConfig",
    "DegradationParams",
    "FaceDataModule",
    "FaceDataset",
    "ImageFolderSource",
    "LmdbSource",
    "apply_degradation",
    "decode_image",
    "degrade",
    "list_image_files",
    "pack_lmdb",
    "preset",
    "sample_params",
]

"""Training utilities shared by the stage modules (no Hydra)."""

from .callbacks import ExportWeights
from .ema import EMA
from .image_logging import image_grid, log_code_histogram, log_image_grid

__all__ = ["EMA", "ExportWeights", "image_grid", "log_code_histogram", "log_image_grid"]

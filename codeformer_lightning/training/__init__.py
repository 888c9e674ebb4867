"""Training utilities shared by the stage modules (no Hydra)."""

from .callbacks import ExportWeights
from .checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from .ema import EMA
from .image_logging import image_grid, log_code_histogram, log_image_grid
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .plugins import trainer_plugins
from .preemption import PreemptionCheckpoint, slurm_environment
from .progress import StepProgressBar
from .quiet import quiet_known_noise
from .resume import RandomStateCheckpoint, find_resume_checkpoint, resolve_ckpt_path

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "ExportWeights",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PreemptionCheckpoint",
    "RandomStateCheckpoint",
    "StepProgressBar",
    "atomic_torch_save",
    "find_resume_checkpoint",
    "image_grid",
    "log_code_histogram",
    "log_image_grid",
    "quiet_known_noise",
    "resolve_ckpt_path",
    "slurm_environment",
    "trainer_plugins",
]

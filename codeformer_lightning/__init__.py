"""codeformer_lightning: CodeFormer-style blind face restoration on PyTorch Lightning.

Public API:

* :mod:`codeformer_lightning.nn`: pure ``torch.nn`` networks (``CodeFormer``, ``VQAutoEncoder``, ...).
* :func:`load_pretrained`: published ``.pth`` or native ``.safetensors`` -> module in eval mode.
* :func:`save_weights` / :func:`save_published` / :func:`convert_checkpoint`: write and convert.
"""

from .checkpoints import (
    CheckpointError,
    CheckpointInfo,
    convert_checkpoint,
    inspect_checkpoint,
    load_pretrained,
    save_published,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "convert_checkpoint",
    "inspect_checkpoint",
    "load_pretrained",
    "save_published",
    "save_weights",
]

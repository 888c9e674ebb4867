"""codeformer_lightning: CodeFormer-style blind face restoration on PyTorch Lightning.

Public API:

* :mod:`codeformer_lightning.nn`: pure ``torch.nn`` networks (``CodeFormer``, ``VQAutoEncoder``, ...).
* :func:`load_pretrained`: published ``.pth`` or native ``.safetensors`` -> module in eval mode.
* :func:`save_weights` / :func:`save_published` / :func:`convert_checkpoint`: write and convert.
* :class:`FaceRestorer`: detect, align, restore and paste back faces in whole photos.
* :func:`compose_config` + :func:`run`: ``codeformer-train`` / ``codeformer-pipeline`` from Python
  (``run(compose_config("experiment=quickstart_vqgan", "trainer.max_steps=50"))``); the result holds
  the run's files and final metrics.

Training (``codeformer_lightning.models``, ``.data``, ``compose_config``, ``run``) imports Lightning and
Hydra on first use; the other names do not.
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


def __getattr__(name: str):
    # Imported on first use: the inference stack (OpenCV, detectors) is not needed to load weights,
    # nor Lightning and Hydra (training) to restore faces.
    if name == "FaceRestorer":
        from .inference import FaceRestorer

        return FaceRestorer
    if name in ("compose_config", "run"):
        from .commands import train

        return getattr(train, name)
    raise AttributeError(f"module 'codeformer_lightning' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "FaceRestorer",
    "compose_config",
    "convert_checkpoint",
    "inspect_checkpoint",
    "load_pretrained",
    "run",
    "save_published",
    "save_weights",
]

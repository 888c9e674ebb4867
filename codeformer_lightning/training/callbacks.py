"""Small generic Lightning callbacks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


def discriminator_export_path(export_path: str | Path) -> Path:
    """Where a stage that exports ``export_path`` puts its discriminator: ``<stem>_discriminator.safetensors``
    next to it (``weights/vqgan.safetensors`` -> ``weights/vqgan_discriminator.safetensors``)."""
    export_path = Path(export_path)
    return export_path.with_name(f"{export_path.stem}_discriminator.safetensors")


class ExportWeights(pl.Callback):
    """At the end of training, rank 0 calls ``pl_module.export(path)`` (e.g. the EMA weights).

    Works with any LightningModule that has an ``export(path)`` method (stage I writes its EMA
    autoencoder as ``.safetensors`` for :func:`codeformer_lightning.load_pretrained`). A module that
    also has ``export_discriminator(path)`` (stage I) writes its discriminator to
    :func:`discriminator_export_path` of ``path``: the published stage III starts from it.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            raise TypeError(f"ExportWeights: {type(pl_module).__name__} has no export(path) method")
        if trainer.is_global_zero:
            pl_module.export(self.path)
            if hasattr(pl_module, "export_discriminator"):
                pl_module.export_discriminator(discriminator_export_path(self.path))

"""Small generic Lightning callbacks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class ExportWeights(pl.Callback):
    """At the end of training, rank 0 calls ``pl_module.export(path)`` (e.g. the EMA weights).

    Works with any LightningModule that has an ``export(path)`` method (stage I writes its EMA
    autoencoder as ``.safetensors`` for :func:`codeformer_lightning.load_pretrained`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            raise TypeError(f"ExportWeights: {type(pl_module).__name__} has no export(path) method")
        if trainer.is_global_zero:
            pl_module.export(self.path)

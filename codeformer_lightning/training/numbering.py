"""One numbering for everything a run writes: the optimiser steps completed.

Lightning names checkpoints and our image grids by ``trainer.global_step`` (the steps completed),
but logs metrics at ``steps - 1`` (its count of batches stepped before the current one), so the
validation after 100 steps appeared at step 99 next to ``step_00000100.ckpt``. When a metric named
``step`` is logged, Lightning uses its value as the loggers' step and as the ``{step}`` of checkpoint
file names; :class:`StepNumbering` logs it. The stage modules add it themselves
(``configure_callbacks``); a LightningModule that logs epoch-end metrics logs ``step`` with them.
"""

from __future__ import annotations

import pytorch_lightning as pl


class StepNumbering(pl.Callback):
    """Log ``step = trainer.global_step`` with every training step's and every validation's metrics.

    Runs before the checkpoint callbacks (Lightning orders them last), so ``step_{step}.ckpt``
    carries the same number as the metrics and images of that step.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        # after the optimiser step(s) of this batch, before Lightning sends the step's metrics
        pl_module.log("step", float(trainer.global_step), on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("step", float(trainer.global_step), on_epoch=True)

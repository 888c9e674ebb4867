"""A test-only callback: each rank writes its final weights, so a test can compare the ranks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class SaveRankWeights(pl.Callback):
    """At the end of fit, rank ``k`` saves its module's ``state_dict`` to ``out_dir/rank{k}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "global_step": trainer.global_step}, self.out_dir / f"rank{trainer.global_rank}.pt")

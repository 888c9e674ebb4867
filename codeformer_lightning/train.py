"""Train one stage from a composed config: :func:`train`, what ``codeformer-train`` runs (the command
is :mod:`codeformer_lightning.commands.train`; with ``pipeline`` set it runs
:func:`codeformer_lightning.pipeline.run`, which calls :func:`train` per stage).

    codeformer-train experiment=quickstart                      # tiny stages I -> II -> III on CPU
    codeformer-train experiment=vqgan data.train_dir=/data/ffhq_512 trainer=ddp trainer.devices=8
    codeformer-train experiment=vqgan ckpt_path=outputs/vqgan/<run>/checkpoints/last.ckpt   # resume
    codeformer-train experiment=vqgan ckpt_path=auto hydra.run.dir=outputs/vqgan/run1   # resume if possible
    codeformer-train -m hparams_search=vqgan_optuna experiment=quickstart_vqgan          # Optuna sweep
    codeformer-train --cfg job experiment=cft                   # print the composed config, run nothing

The configs live in ``codeformer_lightning/conf`` (``--help`` lists the groups). Every run writes
into ``outputs/<task_name>/<timestamp>/``: ``config.yaml`` (resolved), ``.hydra/`` (as composed and
the overrides), ``checkpoints/``, the logger's folder and ``weights/<task_name>.safetensors``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from .config_checks import ConfigError, check_config
from .training.resume import resolve_ckpt_path

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (``callbacks``, ``logger``).

    Entries set to null (``callbacks.rich_progress_bar=null``) are skipped.
    """
    if not cfg:
        return []
    return [instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]


@rank_zero_only
def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    """Write ``cfg`` with every interpolation resolved: the exact settings this run used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, model: pl.LightningModule, trainer: pl.Trainer) -> None:
    """Send the resolved config and parameter counts to every logger."""
    if not trainer.loggers:
        return
    hparams = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        for key in ("task_name", "tags", "seed", "ckpt_path", "model", "data", "trainer", "callbacks")
        if key in cfg
    }
    hparams["params/total"] = sum(p.numel() for p in model.parameters())
    hparams["params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one stage as ``cfg`` describes (a composed ``train.yaml``); return the final metrics.

    Order: resolve ``ckpt_path=auto`` / ``auto:<folder>`` (the newest valid checkpoint of this run's
    folder or of ``<folder>``, see :func:`~codeformer_lightning.training.resume.resolve_ckpt_path`),
    validate the config, seed, build data, model, callbacks, loggers and trainer, log the
    hyperparameters, ``fit`` (resuming from ``cfg.ckpt_path`` when set: the run continues exactly
    where the checkpoint was taken), optionally ``test``. All ranks return after a barrier, so files
    written by rank 0 at the end of training (exported weights) exist everywhere.
    """
    resolved = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    if resolved != cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = resolved  # config.yaml records the checkpoint actually resumed from
    check_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    output_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, output_dir / "config.yaml")

    log.info("Data: %s", cfg.data._target_)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    log.info("Model: %s", cfg.model._target_)
    model: pl.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(cfg, model, trainer)

    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = _as_floats(trainer.callback_metrics)
        if cfg.get("test", False):
            trainer.test(model, datamodule=datamodule)
            metrics.update(_as_floats(trainer.callback_metrics))
    finally:
        _finish_wandb()
    trainer.strategy.barrier("codeformer_train_end")
    log.info("Run folder: %s", output_dir)
    return metrics


def _finish_wandb() -> None:
    # One W&B run per stage: a pipeline or a sweep trains several in one process.
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v) or v.numel() == 1}


def objective(metrics: dict[str, float], name: str | None) -> float | None:
    """The value an Optuna sweep optimises (``optimized_metric`` in ``hparams_search/*.yaml``)."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged by this run; logged metrics: {sorted(metrics)}"
        )
    return metrics[name]



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
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError
from pytorch_lightning.utilities import rank_zero_only

from .config_checks import ConfigError, check_config
from .training.quiet import quiet_known_noise
from .training.resume import resolve_ckpt_path
from .training.summary import StageRun, stage_run

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (``cfg.callbacks``, ``cfg.logger``).

    ``hydra.utils.instantiate(cfg.callbacks)`` returns a dict of configs (the group itself has no
    ``_target_``); this returns the objects, ready for ``pl.Trainer(callbacks=..., logger=...)``.
    Entries set to null (``callbacks.rich_progress_bar=null``) are skipped.
    """
    if not cfg:
        return []
    return [
        instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry
    ]


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


def default_output_dir(cfg: DictConfig) -> Path:
    """``<paths.log_dir>/<task_name>/<YYYY-mm-dd_HH-MM-SS>``, the folder Hydra would make (a new one)."""
    base = Path(cfg.paths.log_dir) / str(cfg.task_name) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder, n = base, 0
    while folder.exists():  # two runs in the same second keep their own folders
        n += 1
        folder = base.with_name(f"{base.name}_{n}")
    return folder


def ensure_output_dir(cfg: DictConfig) -> Path:
    """The run folder ``cfg.paths.output_dir``. Outside a Hydra run (``train(cfg)`` on a config from
    ``compose``, where ``${hydra:runtime.output_dir}`` has nothing to resolve against) it is set to
    :func:`default_output_dir` first."""
    try:
        return Path(cfg.paths.output_dir)
    except InterpolationResolutionError:
        if HydraConfig.initialized():
            raise
    folder = default_output_dir(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    log.info("No Hydra run folder: writing into %s (set paths.output_dir to choose)", folder)
    return folder


def train(cfg: DictConfig) -> StageRun:
    """Fit one stage as ``cfg`` describes (a composed ``train.yaml``); return what it wrote and measured.

    Works inside ``@hydra.main`` (the run folder is Hydra's) and on a config from Hydra's
    ``compose`` (the run folder is ``paths.output_dir`` if set, else :func:`default_output_dir`).
    Order: resolve ``ckpt_path=auto`` / ``auto:<folder>`` (the newest valid checkpoint of this run's
    folder or of ``<folder>``, see :func:`~codeformer_lightning.training.resume.resolve_ckpt_path`),
    validate the config, seed, build data, model, callbacks, loggers and trainer, log the
    hyperparameters, ``fit`` (resuming from ``cfg.ckpt_path`` when set: the run continues exactly
    where the checkpoint was taken), optionally ``test``. All ranks return after a barrier, so files
    written by rank 0 at the end of training (exported weights) exist everywhere.
    """
    quiet_known_noise()
    output_dir = ensure_output_dir(cfg)
    resolved = resolve_ckpt_path(cfg.get("ckpt_path"), str(output_dir))
    if resolved != cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = resolved  # config.yaml records the checkpoint actually resumed from
    check_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
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
        result = stage_run(str(cfg.task_name), output_dir, trainer, metrics)
    finally:
        _finish_wandb()
    trainer.strategy.barrier("codeformer_train_end")
    return result


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
            [
                f"optimized_metric={name} was not logged by this run (logged: {', '.join(sorted(metrics))}). "
                f"Fix: `optimized_metric=<one of them>`"
            ]
        )
    return metrics[name]

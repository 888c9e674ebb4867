"""``codeformer-train``: train one stage (or a pipeline of stages) from the Hydra config tree, and its
Python equivalent (:func:`compose_config` + :func:`run`).

    codeformer-train experiment=quickstart                      # tiny stages I -> II -> III on CPU
    codeformer-train experiment=vqgan data.train_dir=/data/ffhq_512 trainer=ddp trainer.devices=8
    codeformer-train experiment=vqgan ckpt_path=outputs/vqgan/<run>/checkpoints/last.ckpt   # resume
    codeformer-train -m hparams_search=vqgan_optuna experiment=quickstart_vqgan          # Optuna sweep
    codeformer-train --cfg job experiment=cft                   # print the composed config, run nothing

    from codeformer_lightning import compose_config, run
    result = run(compose_config("experiment=quickstart_vqgan", "trainer.max_steps=50"))

Also ``python -m codeformer_lightning.commands.train ...`` (what Lightning's DDP launcher re-runs for
the other ranks). The configs live in ``codeformer_lightning/conf`` (``--help`` lists the groups).
Every run writes into ``outputs/<task_name>/<timestamp>/``: ``config.yaml`` (resolved), ``.hydra/``
(as composed and the overrides; commands only), ``checkpoints/``, the logger's folder and
``weights/<task_name>.safetensors``; a summary of those files and the final metrics ends the run.
A config that cannot run is reported as a list of problems with their fixes, exit status 2.
"""

from __future__ import annotations

import copy
import logging
import sys
from os import PathLike

import hydra
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities import rank_zero_only

from .. import pipeline
from ..config_checks import ConfigError
from ..train import default_output_dir, objective, train
from ..training.summary import PipelineRun, StageRun

#: the packaged config tree (``conf/`` of the repository)
CONF_MODULE = "codeformer_lightning.conf"
#: where a composed config keeps the overrides it was composed with (the pipeline passes them on)
_OVERRIDES_KEY = "_overrides_"


def compose_config(
    *overrides: str, config_name: str = "train", output_dir: str | PathLike | None = None
) -> DictConfig:
    """The config ``codeformer-train <overrides>`` (``config_name="pipeline"``: ``codeformer-pipeline``)
    would run, composed from the packaged config tree, for :func:`run`.

    ``output_dir``: the run folder (default: a new ``<paths.log_dir>/<task_name>/<timestamp>``, chosen
    now as the command chooses it at launch, so ``instantiate_group(cfg.callbacks)`` resolves). The
    overrides are kept with the config, so a pipeline passes them on to its stages as the command does.
    """
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir if output_dir is not None else default_output_dir(cfg))
        cfg[_OVERRIDES_KEY] = list(overrides)
    return cfg


def run(cfg: DictConfig) -> StageRun | PipelineRun:
    """Train what ``cfg`` describes (from :func:`compose_config`, Hydra's ``compose`` or
    ``@hydra.main``): the stages of ``cfg.pipeline`` in sequence when it is set, else one stage.
    Prints the summary of what was written and measured, and returns it (``.metrics``: the final
    metrics). Raises :class:`~codeformer_lightning.config_checks.ConfigError` listing every problem
    of a config that cannot run."""
    if not logging.getLogger().handlers:  # a plain Python session: show the run's progress lines
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    cfg = copy.deepcopy(cfg)  # the run fills in its folder and checkpoint: the caller's config stays as it was
    overrides = None
    if _OVERRIDES_KEY in cfg:
        with open_dict(cfg):
            overrides = list(cfg.pop(_OVERRIDES_KEY))
    result = pipeline.run(cfg, overrides) if cfg.get("pipeline") else train(cfg)
    _print_summary(result)
    return result


@rank_zero_only
def _print_summary(result: StageRun | PipelineRun) -> None:
    print(f"\n{result}", flush=True)


def run_command(cfg: DictConfig) -> float | None:
    """:func:`run` for the console commands: a config problem is printed (no traceback) and ends the
    process with status 2; returns the sweep objective (``optimized_metric``) or None."""
    try:
        return objective(run(cfg).metrics, cfg.get("optimized_metric"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``codeformer-train``."""
    return run_command(cfg)


if __name__ == "__main__":
    main()

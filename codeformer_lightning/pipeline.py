"""``codeformer-pipeline``: train stage I -> II -> III in sequence, each from the previous export.

    codeformer-pipeline data.train_dir=/data/ffhq_512 trainer=ddp trainer.devices=8
    codeformer-pipeline pipeline.stages.vqgan=null \\
        'pipeline.stages.code_predictor.overrides=["model.autoencoder=/weights/vqgan.safetensors"]'
    codeformer-train experiment=quickstart        # the same machinery at tiny size, plus an evaluation

``pipeline.stages`` is an ordered mapping ``name -> {experiment, weights_from, discriminator_from,
overrides}``. Each stage is composed exactly as ``codeformer-train experiment=<experiment>`` would be,
with

* every override of this command except ``experiment=``, ``pipeline.*``, ``task_name=`` and
  ``ckpt_path=`` (resume one stage through its ``overrides``) (so
  ``trainer=ddp trainer.devices=8`` or ``trainer.max_steps=2`` reach every stage),
* ``<key>=<export_path of stage>`` for each ``stage: key`` of ``weights_from`` whose stage ran
  (e.g. ``{vqgan: model.autoencoder}``),
* ``<key>=<discriminator the stage exported>`` for each ``stage: key`` of ``discriminator_from``
  whose stage ran and exported one (``{vqgan: model.discriminator_from}``: the published stage III
  starts from stage I's discriminator, see
  :func:`~codeformer_lightning.training.callbacks.discriminator_export_path`),
* the stage's own ``overrides`` list (they win),

and trains in ``<run>/<stage name>/``. ``pipeline.evaluate`` (optional) is then called with
``weights=<last export>`` and ``out_dir=<run>``; it returns a dict of metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from .train import save_resolved_config, train
from .training.callbacks import discriminator_export_path

log = logging.getLogger(__name__)

#: Overrides that configure the pipeline itself rather than its stages.
_PIPELINE_KEYS = ("experiment", "task_name", "pipeline", "hparams_search", "ckpt_path")


def quote(value: object) -> str:
    """``value`` as a Hydra override value (quoted, so paths with spaces or '=' survive)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def shared_overrides() -> list[str]:
    """This command's overrides that every stage receives."""
    shared = []
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("~+").split("=", 1)[0]
        if not any(key == k or key.startswith(k + ".") for k in _PIPELINE_KEYS):
            shared.append(override)
    return shared


def stage_overrides(
    stage: DictConfig, output_dir: Path, exports: dict[str, str], shared: list[str]
) -> list[str]:
    """The overrides that compose one stage's config (see the module docstring for the order).

    ``exports``: ``{stage name: exported weight file}`` of the stages that already ran.
    """
    overrides = [f"experiment={stage.experiment}", *shared, f"paths.output_dir={quote(output_dir)}"]
    for source, key in (stage.get("weights_from") or {}).items():
        if source in exports:
            overrides.append(f"{key}={quote(exports[source])}")
    for source, key in (stage.get("discriminator_from") or {}).items():
        if source in exports and discriminator_export_path(exports[source]).is_file():
            overrides.append(f"{key}={quote(discriminator_export_path(exports[source]))}")
    overrides.extend(stage.get("overrides") or [])
    return overrides


def run(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.pipeline.stages`` in order; return every stage's metrics as ``<stage>/<metric>``.

    Must run inside a Hydra application (``codeformer-train`` / ``codeformer-pipeline``): the stages
    are composed from the same config tree with the same overrides. Stages set to null are skipped
    (give the next stage its input weights in its ``overrides``).
    """
    out = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out / "config.yaml")
    shared = shared_overrides()
    exports: dict[str, str] = {}
    last: str | None = None
    metrics: dict[str, float] = {}
    for name, stage in cfg.pipeline.stages.items():
        if stage is None:
            log.info("Pipeline: skipping stage %s", name)
            continue
        overrides = stage_overrides(stage, out / str(name), exports, shared)
        log.info("Pipeline: stage %s: %s", name, " ".join(overrides))
        stage_cfg = compose(config_name="train", overrides=overrides)
        metrics.update({f"{name}/{k}": v for k, v in train(stage_cfg).items()})
        last = exports[str(name)] = str(stage_cfg.export_path)
        if not Path(last).is_file():
            raise RuntimeError(
                f"pipeline stage {name} finished without writing its weights to export_path={last}; "
                "the next stages start from them: keep callbacks.export_weights enabled"
            )
    evaluate = cfg.pipeline.get("evaluate")
    if evaluate is not None and last is not None and rank_zero_only.rank == 0:
        metrics.update(instantiate(evaluate, weights=last, out_dir=str(out)))
    return metrics


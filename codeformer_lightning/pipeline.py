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

Before the first stage starts, every stage's config is composed and checked (the files earlier
stages will write count as present), so a problem of stage III is reported before hours of stage I.

Resuming a killed pipeline: the same command with ``ckpt_path=auto`` and the run's folder
(``hydra.run.dir=<run>``; ``launcher=slurm`` sets ``ckpt_path=auto`` itself). A stage that finished
(its folder holds :data:`STAGE_DONE`, written after its export) is skipped and its export reused;
the others get ``ckpt_path=auto``: each continues from the newest valid checkpoint in its folder,
or starts at step 0. The result equals an uninterrupted run's (``tests/training/test_resume_pipeline.py``).
A finished stage composed with other overrides than this run's is an error, not a silent reuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from .config_checks import ConfigError, find_problems
from .train import ensure_output_dir, save_resolved_config, train
from .training.callbacks import discriminator_export_path
from .training.summary import PipelineRun, StageRun

log = logging.getLogger(__name__)

#: Overrides that configure the pipeline itself rather than its stages.
_PIPELINE_KEYS = ("experiment", "task_name", "pipeline", "hparams_search", "ckpt_path")
#: written into a stage's folder once the stage has trained and exported; a resumed pipeline skips it
STAGE_DONE = "stage_complete.json"
#: what a resumed pipeline adds to every stage that has not finished
_RESUME = "ckpt_path=auto"


def quote(value: object) -> str:
    """``value`` as a Hydra override value (quoted, so paths with spaces or '=' survive)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


#: the packaged config tree, for composing stages outside a Hydra application
CONF_MODULE = "codeformer_lightning.conf"


def shared_overrides(overrides: list[str] | None = None) -> list[str]:
    """The overrides (default: this Hydra run's) that every stage receives."""
    if overrides is None:
        if not HydraConfig.initialized():
            log.warning(
                "Pipeline outside a Hydra run: its overrides are unknown, so the stages get none; compose the "
                "config with codeformer_lightning.compose_config, or pass overrides= to pipeline.run"
            )
            return []
        overrides = list(HydraConfig.get().overrides.task)
    shared = []
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        if not any(key == k or key.startswith(k + ".") for k in _PIPELINE_KEYS):
            shared.append(override)
    return shared


def stage_overrides(
    stage: DictConfig,
    output_dir: Path,
    exports: dict[str, str],
    shared: list[str],
    exists: Callable[[Path], bool] = Path.is_file,
) -> list[str]:
    """The overrides that compose one stage's config (see the module docstring for the order).

    ``exports``: ``{stage name: exported weight file}`` of the stages that already ran (or will);
    ``exists``: whether a discriminator file is there to pass on.
    """
    overrides = [f"experiment={stage.experiment}", *shared, f"paths.output_dir={quote(output_dir)}"]
    for source, key in (stage.get("weights_from") or {}).items():
        if source in exports:
            overrides.append(f"{key}={quote(exports[source])}")
    for source, key in (stage.get("discriminator_from") or {}).items():
        if source in exports and exists(discriminator_export_path(exports[source])):
            overrides.append(f"{key}={quote(discriminator_export_path(exports[source]))}")
    overrides.extend(stage.get("overrides") or [])
    return overrides


@contextlib.contextmanager
def _config_tree() -> Iterator[None]:
    """Hydra's config search path: the running application's, else the packaged tree."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            yield


def check_stages(cfg: DictConfig, out: Path, shared: list[str]) -> None:
    """Compose every stage as it will run and raise one :class:`ConfigError` listing the problems of
    all of them; the files earlier stages will export count as present."""
    exports: dict[str, str] = {}
    problems = []
    for name, stage in cfg.pipeline.stages.items():
        if stage is None:
            continue
        overrides = stage_overrides(stage, out / str(name), exports, shared, exists=lambda _: True)
        stage_cfg = compose(config_name="train", overrides=overrides)
        pending = [p for e in exports.values() for p in (e, str(discriminator_export_path(e)))]
        problems += [f"stage {name}: {p}" for p in find_problems(stage_cfg, pending)]
        exports[str(name)] = str(stage_cfg.export_path)
    if problems:
        raise ConfigError(problems)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> PipelineRun:
    """Train ``cfg.pipeline.stages`` in order; return what each stage wrote and measured, and the
    evaluation's metrics (``.metrics`` holds them all as ``<stage>/<metric>``).

    ``overrides``: the overrides ``cfg`` was composed with (default: the running Hydra
    application's); every stage receives them. Inside ``@hydra.main`` the stages are composed from
    the application's config tree, outside it from the packaged one. Stages set to null are skipped
    (give the next stage its input weights in its ``overrides``).
    """
    resume = _resumes(cfg.get("ckpt_path"))
    out = ensure_output_dir(cfg)
    shared = shared_overrides(overrides)
    with _config_tree():
        check_stages(cfg, out, shared)
        save_resolved_config(cfg, out / "config.yaml")
        result = PipelineRun(out)
        exports: dict[str, str] = {}
        for name, stage in cfg.pipeline.stages.items():
            if stage is None:
                log.info("Pipeline: skipping stage %s", name)
                continue
            name, stage_dir = str(name), out / str(name)
            # a resumed stage gets ckpt_path=auto before its own overrides, which win; the record of a
            # finished stage holds the overrides without it (the same stage, resumed or not)
            stage_args = stage_overrides(stage, stage_dir, exports, [*shared, _RESUME] if resume else shared)
            identity = [a for a in stage_args if a != _RESUME]
            finished = _finished_stage(stage_dir, identity) if resume else None
            if finished is not None:
                log.info("Pipeline: stage %s finished before (%s): not trained again", name, stage_dir / STAGE_DONE)
                result.stages[name], exports[name] = finished
                continue
            log.info("Pipeline: stage %s: %s", name, " ".join(stage_args))
            stage_cfg = compose(config_name="train", overrides=stage_args)
            result.stages[name] = train(stage_cfg)
            exports[name] = str(stage_cfg.export_path)
            if not Path(exports[name]).is_file():
                raise RuntimeError(
                    f"pipeline stage {name} finished without writing its weights to export_path={exports[name]}; "
                    "the next stages start from them: keep callbacks.export_weights enabled"
                )
            _mark_finished(stage_dir, identity, result.stages[name], exports[name])
    _evaluate(cfg, out, list(exports.values())[-1] if exports else None, result)
    return result


def _resumes(ckpt_path: object) -> bool:
    """Whether the pipeline resumes (``ckpt_path=auto``); any other checkpoint names no one stage."""
    if ckpt_path is None:
        return False
    if str(ckpt_path) == "auto":
        return True
    raise ConfigError(
        [
            f"ckpt_path={ckpt_path}: a pipeline resumes with `ckpt_path=auto hydra.run.dir=<the run's folder>` "
            "(finished stages are skipped, the others continue from their newest checkpoint). Fix: use "
            "ckpt_path=auto, or resume one stage from a file with "
            "'pipeline.stages.<name>.overrides=[ckpt_path=<file>]'"
        ]
    )


@rank_zero_only
def _mark_finished(stage_dir: Path, stage_args: list[str], run: StageRun, export: str) -> None:
    """Write :data:`STAGE_DONE`: the overrides the stage was composed with, its export and its summary."""
    record = {
        "name": run.name,
        "overrides": stage_args,
        "export": export,
        "step": run.step,
        "metrics": run.metrics,
        "weights": [str(p) for p in run.weights],
        "checkpoints": {label: str(p) for label, p in run.checkpoints.items()},
        "logs": {label: str(p) for label, p in run.logs.items()},
        "config": str(run.config) if run.config else None,
    }
    part = stage_dir / f"{STAGE_DONE}.part"
    part.write_text(json.dumps(record, indent=1))
    part.replace(stage_dir / STAGE_DONE)  # atomic: a kill leaves either no record or a whole one


def _finished_stage(stage_dir: Path, stage_args: list[str]) -> tuple[StageRun, str] | None:
    """``(summary, export)`` of a stage that finished in ``stage_dir`` with these overrides, or None
    when it did not finish (or its export is gone: it is trained, resuming from its checkpoints).
    Raises :class:`ConfigError` when it finished with other overrides."""
    path = stage_dir / STAGE_DONE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["overrides"] != stage_args:
        raise ConfigError(
            [
                f"{stage_dir.name}: the stage finished in {stage_dir} with the overrides {record['overrides']}, "
                f"this run composes it with {stage_args}. Fix: resume with the same overrides, or start a "
                "new run folder (no ckpt_path=auto)"
            ]
        )
    if not Path(record["export"]).is_file():
        log.warning("Pipeline: %s says the stage finished, but its export %s is gone: training it", path, record["export"])
        return None
    run = StageRun(
        record["name"], stage_dir, int(record["step"]), dict(record["metrics"]),
        checkpoints={k: Path(v) for k, v in record["checkpoints"].items() if Path(v).is_file()},
        weights=[Path(p) for p in record["weights"]], logs={k: Path(v) for k, v in record["logs"].items()},
        config=Path(record["config"]) if record["config"] else None,
    )  # fmt: skip
    return run, record["export"]


def _evaluate(cfg: DictConfig, out: Path, weights: str | None, result: PipelineRun) -> None:
    """Run ``pipeline.evaluate`` on the last export (rank 0); record its metrics and new files."""
    evaluate = cfg.pipeline.get("evaluate")
    if evaluate is None or weights is None or rank_zero_only.rank != 0:
        return
    before = set(out.iterdir())
    result.evaluation = dict(instantiate(evaluate, weights=weights, out_dir=str(out)))
    result.evaluation_files = sorted(p for p in out.iterdir() if p not in before and p.is_file())

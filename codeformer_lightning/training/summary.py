"""What a finished run wrote and measured: the closing summary of ``codeformer-train`` and
``codeformer-pipeline`` (and the value :func:`codeformer_lightning.run` returns).

:class:`StageRun` is one trained stage: its folder, checkpoints, exported weights, logs and final
metrics; :class:`PipelineRun` several stages and the evaluation that followed them. ``str()`` of
either is the summary the commands print.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from .callbacks import ExportWeights

#: metrics that count, not measure
_COUNTERS = {"step", "epoch"}
#: the label of the checkpoint to resume from
LAST = "resume with ckpt_path=<this file>"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder when it lies inside it (shorter to read and to paste)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A Markdown table of ``metrics``: pivoted when every name reads ``<group>/<metric>_<column>``
    (``eval/psnr_w0.5`` -> row ``w0.5``, column ``psnr``), else one ``metric | value`` row each."""
    shown = {k: v for k, v in metrics.items() if k not in _COUNTERS}
    if not shown:
        return ""
    parsed = {k: re.fullmatch(r"([\w.-]+/)?([a-z0-9]+)_([\w.]+)", k) for k in shown}
    rows: dict[str, dict[str, float]] = {}
    if all(parsed.values()) and len({m.group(2) for m in parsed.values()}) > 1:
        for key, match in parsed.items():
            rows.setdefault(match.group(3), {})[match.group(2)] = shown[key]
        columns = sorted({c for row in rows.values() for c in row})
        lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(_number(row.get(c)) for c in columns) + " |")
        return "\n".join(lines)
    lines = ["| metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {_number(v)} |" for k, v in sorted(shown.items(), key=lambda kv: (_order(kv[0]), kv[0]))
    ]
    return "\n".join(lines)


def _order(name: str) -> int:
    return {"eval": 0, "val": 1, "test": 2}.get(name.split("/", 1)[0], 3)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@dataclass
class StageRun:
    """One trained stage. ``metrics``: the final logged values (``trainer.callback_metrics``)."""

    name: str
    output_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(
        default_factory=dict
    )  # label -> file: LAST, "best val/psnr 17.1", ...
    weights: list[Path] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)  # "metrics", "images", "tensorboard", ...
    config: Path | None = None

    @property
    def last_checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt``: resume with ``ckpt_path=<it>``; ``load_pretrained(<it>)`` gives the network."""
        return self.checkpoints.get(LAST)

    def file_lines(self) -> list[str]:
        """``what: where`` lines of the files this stage wrote."""
        lines = []
        if self.weights:
            extra = [p.name for p in self.weights[1:]]
            lines.append(
                f"weights: {shown_path(self.weights[0])}" + (f" (+ {', '.join(extra)})" if extra else "")
            )
        if self.checkpoints:
            folder = next(iter(self.checkpoints.values())).parent
            named = [f"{path.name}: {name}" for name, path in self.checkpoints.items()]
            lines.append(f"checkpoints: {shown_path(folder)}/ ({'; '.join(named)})")
        lines += [f"{name}: {shown_path(p)}" + ("/" if p.is_dir() else "") for name, p in self.logs.items()]
        if self.config is not None:
            lines.append(f"config: {shown_path(self.config)}")
        return lines

    def __str__(self) -> str:
        head = f"Finished {self.name}: {self.step} steps in {shown_path(self.output_dir)}"
        table = metrics_table({k: v for k, v in self.metrics.items() if not k.startswith("train/")})
        body = "\n".join(f"  {line}" for line in self.file_lines())
        return f"{head}\n{body}" + (f"\nFinal metrics (step {self.step}):\n{table}" if table else "")


@dataclass
class PipelineRun:
    """Stages trained in sequence, then (optionally) the evaluation of the last one's weights."""

    output_dir: Path
    stages: dict[str, StageRun] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    evaluation_files: list[Path] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """Every stage's metrics as ``<stage>/<metric>``, plus the evaluation's."""
        out = {f"{name}/{k}": v for name, run in self.stages.items() for k, v in run.metrics.items()}
        out.update(self.evaluation)
        return out

    def __str__(self) -> str:
        lines = [
            f"Finished the pipeline ({', '.join(self.stages) or 'no stage'}) in {shown_path(self.output_dir)}"
        ]
        if self.evaluation_files:
            names = ", ".join(p.name for p in self.evaluation_files)
            lines.append(f"  evaluation: {shown_path(self.evaluation_files[0].parent)}/ ({names})")
        for name, run in self.stages.items():
            lines.append(f"  stage {name} ({run.step} steps):")
            lines += [f"    {line}" for line in run.file_lines()]
        if self.evaluation:
            lines += [
                "Final metrics (evaluation of the last stage's weights):",
                metrics_table(self.evaluation),
            ]
        elif self.stages:
            last_name, last = list(self.stages.items())[-1]
            table = metrics_table({k: v for k, v in last.metrics.items() if not k.startswith("train/")})
            if table:
                lines += [f"Final metrics of stage {last_name} (step {last.step}):", table]
        return "\n".join(lines)


def stage_run(name: str, output_dir: Path, trainer: pl.Trainer, metrics: dict[str, float]) -> StageRun:
    """Collect what ``trainer`` wrote (its checkpoint callbacks, ExportWeights, loggers) after ``fit``."""
    run = StageRun(name, Path(output_dir), int(trainer.global_step), dict(metrics))
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.last_model_path and Path(callback.last_model_path).is_file():
            run.checkpoints[LAST] = Path(callback.last_model_path)
        if callback.monitor and callback.best_model_path and Path(callback.best_model_path).is_file():
            score = callback.best_model_score
            label = f"best {callback.monitor} {float(score):.4g}" if score is not None else "best"
            run.checkpoints[label] = Path(callback.best_model_path)
    for callback in trainer.callbacks:
        if isinstance(callback, ExportWeights) and Path(callback.path).is_file():
            # the export, then what the stage wrote next to it (stage I: its discriminator)
            others = sorted(
                p for p in Path(callback.path).parent.glob("*.safetensors") if p != Path(callback.path)
            )
            run.weights += [Path(callback.path), *others]
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if isinstance(logger, CSVLogger) and folder:
            run.logs["metrics"] = Path(folder) / "metrics.csv"
            if (Path(folder) / "images").is_dir():
                run.logs["images"] = Path(folder) / "images"
        elif folder:
            run.logs[type(logger).__name__.removesuffix("Logger").lower()] = Path(folder)
    config = Path(output_dir) / "config.yaml"
    run.config = config if config.is_file() else None
    return run

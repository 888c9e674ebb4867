"""Step-based progress for iteration-counted training (``step 120/300``, not ``Epoch 7/-2``).

The stages count optimiser steps (``trainer.max_steps``), and their epochs are an artefact of the
data set's size, so Lightning's per-epoch bars print one line per epoch with an unknown epoch total.
:class:`StepProgressBar` shows one bar for the whole run instead.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger(__name__)

_MODES = ("auto", "live", "lines")


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's total optimiser steps: ``max_steps``, else ``max_epochs`` x steps per epoch, else None."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        return int(trainer.max_epochs * math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
    return None


def format_metrics(metrics: dict[str, Any]) -> str:
    """``{"train/loss": tensor(0.8312)}`` -> ``"train/loss 0.8312"`` (numbers with 4 significant digits)."""
    parts = []
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepProgressBar(ProgressBar):
    """One progress bar for the whole run, counted in optimiser steps (``trainer.global_step``).

    In a terminal or a notebook (``mode="live"``): a Rich bar ``step 120/300``, elapsed time, ETA,
    steps per second and the progress-bar metrics, plus a transient bar while validating; each
    validation's metrics are printed above the bar. Elsewhere (``mode="lines"``: a log file, SLURM
    output): a plain log line every ``line_every_n_steps`` steps (default: 10 lines per run) and one
    after each validation. ``mode="auto"`` picks by the console. A resumed run counts on from the
    restored step.

    Args:
        refresh_rate: steps between updates of the live bar (0 disables the bar).
        leave: keep the finished bar on screen.
        line_every_n_steps: steps between lines in ``lines`` mode (None: a tenth of the run).
        mode: ``auto``, ``live`` or ``lines``.
        console: the ``rich.console.Console`` of the live bar (default: Rich's, on stdout).
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = True,
        line_every_n_steps: int | None = None,
        mode: str = "auto",
        console: Any = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.refresh_rate = refresh_rate
        self.leave = leave
        self.line_every_n_steps = line_every_n_steps
        self.mode = mode
        self.console = console
        self._enabled = refresh_rate > 0
        self._progress = None  # rich.progress.Progress while the live bar runs
        self._train_task = self._val_task = None
        self._total: int | None = None
        self._start_step = 0
        self._start_time = 0.0
        self._last_step = -1

    # ------------------------------------------------------------------------- ProgressBar API
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:  # the Trainer calls this on ranks other than 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number: not a measurement
        return metrics

    # ------------------------------------------------------------------------- helpers
    def _live(self) -> bool:
        if self.mode != "auto":
            return self.mode == "live"
        from rich.console import Console

        console = self.console or Console()
        if console.is_jupyter:  # Rich draws live bars in notebooks through ipywidgets only
            return importlib.util.find_spec("ipywidgets") is not None
        return console.is_terminal

    def _description(self, step: int) -> str:
        return f"step {step}/{self._total if self._total is not None else '?'}"

    def _timing(self, step: int) -> str:
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        text = f"elapsed {_clock(elapsed)}"
        if done > 0 and self._total is not None:
            text += (
                f", ETA {_clock(elapsed / done * max(0, self._total - step))}, {done / elapsed:.2f} steps/s"
            )
        return text

    def _line_every(self) -> int:
        if self.line_every_n_steps:
            return self.line_every_n_steps
        return max(1, (self._total or 100) // 10)

    # ------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        self._total = total_steps(trainer)
        self._start_step = self._last_step = trainer.global_step
        self._start_time = time.monotonic()
        if self._live():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )  # fmt: skip

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                transient=not self.leave,
                console=self.console,
            )  # fmt: skip
            self._progress.start()
            self._train_task = self._progress.add_task(
                "step", total=self._total, completed=self._start_step, metrics=""
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.is_enabled or step == self._last_step:  # accumulating: no step taken
            return
        self._last_step = step
        last = self._total is not None and step >= self._total
        if self._progress is not None:
            if step % self.refresh_rate == 0 or last:
                metrics = format_metrics(self.get_metrics(trainer, pl_module))
                self._progress.update(self._train_task, completed=step, metrics=metrics)
        elif step % self._line_every() == 0 or last:
            metrics = format_metrics(self.get_metrics(trainer, pl_module))
            log.info(
                "%s (%s)%s", self._description(step), self._timing(step), f"  {metrics}" if metrics else ""
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled and self._progress is not None and not trainer.sanity_checking:
            total = sum(b for b in trainer.num_val_batches if math.isfinite(b)) or None
            self._val_task = self._progress.add_task("validation", total=total, metrics="")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._val_task is not None:
            self._progress.advance(self._val_task)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._val_task is not None:
            self._progress.remove_task(self._val_task)
            self._val_task = None
        val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        text = f"validation at step {trainer.global_step}: {format_metrics(val) or 'no metrics'}"
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            log.info(text)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._train_task = self._val_task = None

    def __getstate__(self) -> dict:
        # the live display holds a thread and locks, which cannot be pickled (ddp_spawn pickles callbacks)
        return {**self.__dict__, "_progress": None, "_train_task": None, "_val_task": None}

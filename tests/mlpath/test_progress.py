"""Issue 13, item 6: one step-counted progress bar per run (live in a terminal, plain lines in a log)."""

from __future__ import annotations

import io
import logging

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
from rich.console import Console

from codeformer_lightning.training import StepProgressBar, quiet_known_noise
from codeformer_lightning.training.progress import total_steps


def _fit(bar: StepProgressBar, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(BoringModel())  # 64 batches per epoch
    return trainer


def test_plain_lines_count_steps_across_epochs(caplog):
    caplog.set_level(logging.INFO, logger="codeformer_lightning.training.progress")
    _fit(StepProgressBar(mode="lines", line_every_n_steps=20), max_steps=70, val_check_interval=35,
         check_val_every_n_epoch=None)
    lines = [r.getMessage() for r in caplog.records]
    steps = [m.split(" (")[0] for m in lines if m.startswith("step ")]
    assert steps == ["step 20/70", "step 40/70", "step 60/70", "step 70/70"]  # not per epoch, not Epoch N/-2
    assert [m.split(":")[0] for m in lines if m.startswith("validation")] == ["validation at step 35",
                                                                            "validation at step 70"]
    assert all("ETA" in m for m in lines if m.startswith("step "))


def test_the_live_bar_shows_steps_done_of_the_total():
    out = io.StringIO()
    bar = StepProgressBar(mode="live", refresh_rate=5, console=Console(file=out, width=120, force_terminal=True))
    _fit(bar, max_steps=40, limit_val_batches=2, val_check_interval=20, check_val_every_n_epoch=None)
    text = out.getvalue()
    assert "40/40" in text and "validation at step 20" in text and "Epoch" not in text


@pytest.mark.parametrize(("args", "expected"), [
    ({"max_steps": 70}, 70),
    ({"max_epochs": 3}, 192),  # 3 epochs x 64 batches
    ({"max_epochs": 3, "accumulate_grad_batches": 4}, 48),  # 16 optimiser steps per epoch
])
def test_total_steps(args, expected):
    trainer = _fit(StepProgressBar(mode="lines"), limit_val_batches=0, **args)
    assert total_steps(trainer) == expected


def test_known_noise_is_silenced_and_other_warnings_are_not():
    import warnings

    quiet_known_noise()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()  # after simplefilter: the filters are installed again, in front
        warnings.warn("Found 250 module(s) in eval mode at the start of training. This may ...", stacklevel=1)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but ...", stacklevel=1)
        warnings.warn("something new", stacklevel=1)
    assert [str(w.message) for w in seen] == ["something new"]

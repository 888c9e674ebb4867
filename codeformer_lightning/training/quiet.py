"""Silence the log lines that say nothing about a codeformer_lightning run.

Each filter below names one Lightning (or torch) message that is known to be irrelevant for the
stage modules and why; everything else is left alone, so a new warning still shows. Installed by
:func:`quiet_known_noise`, which :func:`codeformer_lightning.train.train` calls once per process.
"""

from __future__ import annotations

import logging
import warnings

#: ``(message regex, why it is irrelevant here)`` of the Python warnings we silence.
IRRELEVANT_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
        "stages I and III optimise manually and save after the optimiser step on purpose: a checkpoint "
        "named step N holds the weights after N steps (Lightning's 12-line example asks for the opposite)",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the EMA copies, the frozen stage I target encoder and LPIPS are in eval mode by design",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "the stages count steps across epochs: Lightning logs every log_every_n_steps steps of the whole "
        "run, so short epochs (small data sets) still log",
    ),
    (
        r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`",
        "stages I and III step every schedule once per step, as published, also the discriminator's "
        "before its first update (disc_start_step; the quickstart's stage III has no GAN term): its rate "
        "follows the step count, whether or not it has stepped yet",
    ),
    (
        r".*isinstance\(treespec, LeafSpec\)",
        "a deprecation inside Lightning's own pytree helper (torch >= 2.10), nothing our code can change",
    ),
)

#: Prefixes of Lightning's information lines that we drop (logger ``pytorch_lightning.*``).
IRRELEVANT_INFO: tuple[tuple[str, str], ...] = (
    (
        "💡 Tip:",
        "advertisements for Lightning's cloud services, printed once per Trainer (3x in the quickstart)",
    ),
    ("TPU available: False", "no TPU: a line that only matters on TPU machines"),
    ("HPU available: False", "no HPU: a line that only matters on Habana machines"),
)


class _DropIrrelevantInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) for prefix, _ in IRRELEVANT_INFO)


_FILTER = _DropIrrelevantInfo()


def quiet_known_noise() -> None:
    """Install the filters of :data:`IRRELEVANT_WARNINGS` and :data:`IRRELEVANT_INFO` (idempotent)."""
    for pattern, _why in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's rank_zero_info logs through whichever of these loggers its packages set up
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "lightning_fabric.utilities.rank_zero",
        "lightning.pytorch.utilities.rank_zero",
    ):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

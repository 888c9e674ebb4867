"""Preemption: on SIGTERM or the SLURM requeue signal, checkpoint at the next step boundary, requeue
the SLURM job and exit; the next start (``ckpt_path=auto``) continues from that checkpoint.

Lightning's own SLURM handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside
the signal handler, i.e. wherever the main thread happens to be: possibly between the generator and
the discriminator update of a step (a checkpoint no uninterrupted run ever passes through), and under
DDP in the middle of a collective on one rank only. :class:`PreemptionCheckpoint` keeps Lightning's
SLURM environment (it says whether to requeue and on which signal) but only records the signal; at
the end of the current training batch (or validation run) all ranks agree (one all-reduce), save
the checkpoint together, rank 0 runs ``scontrol requeue`` and every rank exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1") -> SLURMEnvironment:
    """Lightning's SLURM environment with the requeue signal by name (for configs: ``"SIGUSR1"``)."""
    try:
        signum = signal.Signals[requeue_signal]
    except KeyError:
        raise ValueError(
            f"requeue_signal={requeue_signal!r} is not a signal name such as 'SIGUSR1'"
        ) from None
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=signum)


def slurm_job_id() -> str | None:
    """This job's id for ``scontrol`` (``<array job>_<task>`` for array jobs), None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True when it succeeded (failures are logged, not raised)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not requeue SLURM job %s: %s", job_id, exc)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


def _cluster_environment(trainer: pl.Trainer) -> Any:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env if env is not None else getattr(trainer._accelerator_connector, "cluster_environment", None)


class PreemptionCheckpoint(pl.Callback):
    """Checkpoint, requeue and exit on SIGTERM or the SLURM requeue signal (see the module docstring).

    Args:
        dirpath: folder of the checkpoint (the run's ``checkpoints/``: ``ckpt_path=auto`` finds it).
        filename: its name; each preemption replaces the previous one (atomically, with
            :class:`~codeformer_lightning.training.checkpoint_io.AtomicCheckpointIO`).

    The SLURM requeue signal is the ``requeue_signal`` of a ``SLURMEnvironment(auto_requeue=True)``
    (``launcher=slurm`` configures SIGUSR1, sent ``signal_delay_s`` before the time limit); only
    then is the job requeued. SIGTERM always leads to the checkpoint and the exit.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "preempted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._received: str | None = None
        self._previous: dict[int, Any] = {}
        self._requeue = False

    # -- signals
    def _record(self, signum: int, frame: Any) -> None:
        # only a flag: the checkpoint waits for a step boundary, where every rank can take part
        self._received = signal.Signals(signum).name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._received = None
        env = _cluster_environment(trainer)
        self._requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        signums = {signal.SIGTERM}
        if self._requeue and env.requeue_signal is not None:
            signums.add(env.requeue_signal)
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, signals are left to Lightning")
            return
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- step boundaries
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        received = self._received is not None
        if trainer.world_size > 1:  # every rank takes the same decision (and then saves together)
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        name = self._received or "a signal on another rank"
        trainer.save_checkpoint(self.path)
        message = f"stopped by {name} at step {trainer.global_step}: checkpoint {self.path}"
        if self._requeue and trainer.is_global_zero:
            job = slurm_job_id()
            requeued = job is not None and requeue_slurm_job(job)
            message += f"; SLURM job {job} {'requeued' if requeued else 'NOT requeued (see the log)'}"
        log.warning("%s (resume with ckpt_path=auto or ckpt_path=%s)", message, self.path)
        raise SIGTERMException(message)

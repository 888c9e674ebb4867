"""Training and validation loaders: a resumable data order, and worker processes that report like
the main process.

**Resumable order.** Why not torch's ``RandomSampler``: it draws each epoch's order from the
global torch generator when the epoch's iterator is created, so a resumed run (fresh generator)
sees a different order and cannot continue inside an epoch. Why not torchdata's
``StatefulDataLoader``: its state counts the batches its iterator *yielded*, and Lightning's fit
loop fetches ahead of the step it runs (workers prefetch more), so a checkpoint taken after batch
``k`` can record ``k + 1`` and the resumed run then silently skips a batch. Here the order of epoch ``e`` is
a function of ``(seed, e)`` only, and the position saved is the number of batches the *training
loop* consumed (``FaceDataModule`` asks the trainer), whatever was prefetched:

* :class:`ResumableSampler` is a :class:`~torch.utils.data.DistributedSampler` (so Lightning does
  not wrap it): every rank computes the same global permutation and takes every ``W``-th sample;
  after ``k`` batches of ``b`` samples on each of ``W`` ranks exactly the first ``k * b * W`` samples
  of the permutation are used, so a resumed run skips them and splits the rest the same way.
* :class:`ResumableLoader` has ``state_dict`` / ``load_state_dict``: Lightning's fit loop stores
  them in checkpoints and, on a restart, loads them before the resumed epoch's first iterator is
  created. Its own generator, reseeded from ``(seed, epoch, rank)`` at every iterator, gives the
  worker seeds, so no iterator draws from the global torch generator (the training step's
  randomness, e.g. dropout, keeps it to itself).

The dataset's epoch (its per-sample degradations) follows the sampler's:
:meth:`ResumableSampler.set_epoch` calls ``dataset.set_epoch`` when the dataset has one.

**Workers.** :class:`ReportingLoader` (both loaders above are ones) makes ``num_workers > 0``
behave like loading in the main process: warnings a worker raises while loading a batch (e.g.
:class:`~codeformer_lightning.data.datasets.BadImageWarning` for a skipped file) travel with the
batch and are re-raised in the main process, and a worker that dies or fails is reported as a
:class:`DataLoaderWorkerError` naming the sample and file it was loading (the dataset's
``describe_sample(index)``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torch.utils.data._utils.pin_memory import pin_memory as _pin_memory

log = logging.getLogger(__name__)

#: ``() -> (epoch, batches)``: the epoch the training loop is in and how many of its batches it has
#: consumed on this rank (an epoch it finished counts as the next epoch at batch 0).
Position = Callable[[], tuple[int, int]]


def _mixed_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (no aliasing such as ``seed + epoch``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- worker reporting
class DataLoaderWorkerError(RuntimeError):
    """A DataLoader worker died or failed; the message names the sample and file it was loading."""


#: warnings caught in this worker process since its last batch was collated
_worker_warnings: list[warnings.WarningMessage] = []


class _BatchWithWarnings:
    """A collated batch plus the warnings its samples raised in a worker (unwrapped in the main process)."""

    def __init__(self, batch: Any, caught: list[tuple[type[Warning], str, str, int]]) -> None:
        self.batch, self.caught = batch, caught

    def pin_memory(self) -> _BatchWithWarnings:  # called by the loader's pin-memory thread
        return _BatchWithWarnings(_pin_memory(self.batch), self.caught)


class _TrackedFetch:
    """Installed as the worker's dataset ``__getitems__``: records in shared memory which sample the
    worker is loading (so its death can be reported) and catches the warnings loading raises."""

    def __init__(self, dataset: Dataset, slot: torch.Tensor, own_getitems: Callable | None) -> None:
        self.dataset, self.slot, self.own_getitems = dataset, slot, own_getitems

    def __call__(self, indices: Sequence[int]) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.own_getitems is not None:
                self.slot[1] = int(indices[0])
                samples = self.own_getitems(indices)
            else:
                samples = []
                for i in indices:
                    self.slot[1] = int(i)
                    samples.append(self.dataset[i])
        self.slot[1] = -1  # left set when loading raised: the main process reports it
        _worker_warnings.extend(caught)
        return samples


class _WorkerSetup:
    """``worker_init_fn`` of a :class:`ReportingLoader`: track fetches, then the user's init."""

    def __init__(self, reading: torch.Tensor, user_init: Callable[[int], None] | None) -> None:
        self.reading, self.user_init = reading, user_init

    def __call__(self, worker_id: int) -> None:
        dataset = get_worker_info().dataset
        slot = self.reading[worker_id]
        slot[0] = os.getpid()
        own = getattr(type(dataset), "__getitems__", None)
        own = own.__get__(dataset) if own is not None else None
        dataset.__getitems__ = _TrackedFetch(dataset, slot, own)
        _worker_warnings.clear()
        if self.user_init is not None:
            self.user_init(worker_id)


class _CollateWithWarnings:
    """The loader's collate function, attaching the warnings caught in the worker to the batch."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> Any:
        batch = self.collate(samples)
        if not _worker_warnings:
            return batch
        caught = [(w.category, str(w.message), w.filename, w.lineno) for w in _worker_warnings]
        _worker_warnings.clear()
        return _BatchWithWarnings(batch, caught)


class _ReportingIterator:
    def __init__(self, loader: ReportingLoader, inner: Iterator) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> _ReportingIterator:
        return self

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        try:
            batch = next(self.inner)
        except StopIteration:
            raise
        except Exception as exc:
            raise self.loader._worker_error(exc) from exc
        if isinstance(batch, _BatchWithWarnings):
            for category, message, filename, lineno in batch.caught:
                # filters and the once-per-location registry of the main process apply
                warnings.warn_explicit(
                    message, category, filename, lineno, registry=self.loader._warning_registry
                )
            batch = batch.batch
        return batch


class ReportingLoader(DataLoader):
    """A DataLoader whose worker processes report like the main process (see the module docstring).

    With ``num_workers == 0`` it is a plain DataLoader. Otherwise each worker records the sample it
    is loading in a shared-memory table, and warnings raised while loading reach the main process
    with the batch. ``dataset.describe_sample(index) -> str`` (optional) names a sample's file.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._warning_registry: dict = {}
        self._reading: torch.Tensor | None = None

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        if self._reading is None or self._reading.shape[0] != self.num_workers:
            self._reading = torch.full((self.num_workers, 2), -1, dtype=torch.int64).share_memory_()
        # the workers receive these two at iterator creation; the loader keeps the user's own
        user_init, user_collate = self.worker_init_fn, self.collate_fn
        self.worker_init_fn = _WorkerSetup(self._reading, user_init)
        self.collate_fn = _CollateWithWarnings(user_collate)
        try:
            inner = super().__iter__()
        finally:
            self.worker_init_fn, self.collate_fn = user_init, user_collate
        return _ReportingIterator(self, inner)

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe_sample", None)
        return f"sample {index} ({describe(index)})" if callable(describe) else f"sample {index}"

    def loading_report(self, exc: BaseException | None = None) -> str | None:
        """What the workers named in ``exc`` ("pid(s) ..." of torch's messages; else every worker
        busy now) were loading when it happened; None when no worker was loading anything."""
        if self._reading is None:
            return None
        match = re.search(r"pid\(?s?\)? ([\d, ]+)", str(exc)) if exc is not None else None
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))} if match else set()
        busy = [
            (w, pid, i)
            for w, (pid, i) in enumerate(self._reading.tolist())
            if i >= 0 and (not pids or pid in pids)
        ]
        if not busy:
            return None
        return "; ".join(f"worker {w} (pid {pid}) was loading {self.describe(i)}" for w, pid, i in busy)

    def _worker_error(self, exc: BaseException) -> DataLoaderWorkerError:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # torch re-raises a worker's exception with its traceback: the last line says what it was
        cause = f"{lines[0]} {lines[-1].strip()}" if "Original Traceback" in str(exc) else lines[0]
        report = self.loading_report(exc)
        if report is None:
            return DataLoaderWorkerError(f"DataLoader worker failed: {cause}")
        return DataLoaderWorkerError(f"{report}: {cause}")


def _multiple_of(order: list[int], w: int, drop: bool) -> list[int]:
    """``order`` cut (``drop``) or padded by wrapping around to a multiple of ``w`` entries."""
    if not order or len(order) % w == 0:
        return order
    if drop:
        return order[: len(order) // w * w]
    return order + (order * math.ceil(w / len(order)))[: w - len(order) % w]


class ResumableSampler(DistributedSampler):
    """Per-epoch permutation of ``dataset`` from ``(seed, epoch)``, split over ``num_replicas`` ranks.

    Rank ``r`` of ``W`` takes samples ``r, r + W, r + 2W, ...`` of the epoch's order (the order padded
    by wrapping around to a multiple of ``W``, or cut with ``drop_last``), as
    :class:`~torch.utils.data.DistributedSampler` does. :meth:`resume` makes the next pass over an
    epoch start after its first ``consumed`` samples. ``len()`` is always the full epoch's count
    (the fit loop counts the resumed epoch's batches from where it stopped).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        epoch: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self._resume_at: tuple[int, int] | None = None
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from the next iterator on (and tell the dataset its epoch)."""
        super().set_epoch(int(epoch))
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(int(epoch))

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue epoch ``epoch`` after the first ``consumed`` samples of its global order."""
        if consumed < 0:
            raise ValueError(f"consumed samples must be >= 0, got {consumed}")
        self.set_epoch(epoch)
        self._resume_at = (int(epoch), int(consumed))

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """The global order of ``epoch`` (default: the current one) before the split over ranks."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch if epoch is None else epoch))
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        w = self.num_replicas
        # cut or pad the whole order to a multiple of W first, as DistributedSampler does: a resumed
        # pass then continues with exactly the samples the uninterrupted one would use
        order = _multiple_of(self.epoch_order(), w, self.drop_last)
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            skip = min(self._resume_at[1], len(order))
        self._resume_at = None  # one pass only: the next epochs start at their beginning
        # (not a multiple of W only after resuming on a different number of ranks: keep them equal)
        rest = _multiple_of(order[skip:], w, self.drop_last)
        return iter(rest[self.rank :: w])

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(ReportingLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning checkpoints.

    ``position``: ``() -> (epoch, batches consumed)`` as the training loop sees it (see
    :data:`Position`); None reports the start of the sampler's epoch. ``state_dict()`` holds
    ``{"epoch", "consumed", "batch_size", "world_size", "dataset_size", "seed"}`` with
    ``consumed`` in samples of the global order; ``load_state_dict`` continues from there (a
    different batch size or world size continues at the same sample, warned as inexact). When
    Lightning swaps the sampler (``overfit_batches`` uses a sequential one) there is no position to
    keep: the state is empty.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        sampler: ResumableSampler,
        position: Position | None = None,
        **kwargs: Any,
    ) -> None:
        # keyword-only: Lightning rebuilds loaders with a replaced sampler= (e.g. for overfit_batches)
        kwargs.pop("generator", None)
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **kwargs
        )
        self.position = position

    @property
    def _resumable(self) -> ResumableSampler | None:
        return self.sampler if isinstance(self.sampler, ResumableSampler) else None

    def __iter__(self):
        # worker seeds come from this loader's generator: reseed it so they depend on (seed, epoch,
        # rank) only and no iterator ever draws from the global torch generator
        sampler = self._resumable
        parts = (sampler.seed, sampler.epoch, sampler.rank) if sampler is not None else (0, 0, 0)
        self.generator.manual_seed(_mixed_seed(*parts, 1))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        sampler = self._resumable
        if sampler is None:
            return {}
        epoch, batches = self.position() if self.position is not None else (sampler.epoch, 0)
        return {
            "epoch": int(epoch),
            "consumed": int(batches) * int(self.batch_size) * sampler.num_replicas,
            "batch_size": int(self.batch_size),
            "world_size": sampler.num_replicas,
            "dataset_size": len(sampler.dataset),  # type: ignore[arg-type]
            "seed": int(sampler.seed),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self._resumable
        if sampler is None or not state:
            return
        n = len(sampler.dataset)  # type: ignore[arg-type]
        if state["dataset_size"] != n or state["seed"] != sampler.seed:
            warnings.warn(
                f"the checkpoint's training data had {state['dataset_size']} samples and seed {state['seed']}, this run "
                f"has {n} and seed {sampler.seed}: the data order cannot continue, epoch {state['epoch']} starts over",
                stacklevel=2,
            )
            sampler.resume(state["epoch"], 0)
            return
        if (state["batch_size"], state["world_size"]) != (self.batch_size, sampler.num_replicas):
            warnings.warn(
                f"resuming with batch size {self.batch_size} on {sampler.num_replicas} ranks, the checkpoint used "
                f"{state['batch_size']} on {state['world_size']}: epoch {state['epoch']} continues after its first "
                f"{state['consumed']} samples, but the batches differ from an uninterrupted run",
                stacklevel=2,
            )
        sampler.resume(state["epoch"], state["consumed"])
        log.info("training data resumes at epoch %d after %d samples", state["epoch"], state["consumed"])

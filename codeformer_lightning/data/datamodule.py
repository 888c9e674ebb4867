"""``FaceDataModule``: training and validation loaders of clean faces with synthetic degradations."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytorch_lightning as pl
import torch

from .datasets import FaceDataset, ImageFolderSource
from .degradations import PRESETS, DegradationConfig, preset
from .latent_codes import read_latent_codes
from .loaders import ReportingLoader, ResumableLoader, ResumableSampler
from .tasks import check_task

log = logging.getLogger(__name__)


class DataEpochCallback(pl.Callback):
    """Tells the training dataset the epoch (so degradations change every epoch) and reports the
    files skipped as unreadable at every training epoch end. ``FaceDataModule`` adds it to its
    trainer by itself; add it explicitly only for a bare :class:`FaceDataset`."""

    def __init__(self, dataset: FaceDataset | None = None) -> None:
        self.dataset = dataset

    def _dataset(self, trainer: pl.Trainer) -> FaceDataset | None:
        if self.dataset is not None:
            return self.dataset
        dm = getattr(trainer, "datamodule", None)
        return getattr(dm, "train_set", None)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._dataset(trainer)
        if dataset is not None:
            dataset.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._dataset(trainer)
        if dataset is None:
            return
        skipped = dataset.skipped_names()
        if skipped:
            shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            log.warning(
                "rank %d: %d unreadable training files skipped so far: %s",
                trainer.global_rank,
                len(skipped),
                shown,
            )


class FaceDataModule(pl.LightningDataModule):
    """Clean aligned faces (folder or LMDB) and their degraded inputs, for every training stage.

    Args:
        train_dir / train_lmdb: training faces (exactly one of them).
        val_dir / val_lmdb: validation faces; when neither is given, ``val_split`` faces are held out
            of the training set (a fixed choice from ``seed``; 0: no validation).
        image_size: S of every sample (other sizes: ``on_wrong_size``).
        degradation: ``none`` | ``stage2`` | ``stage3_small`` | ``stage3_large`` (see ``PRESETS``).
        task: ``restoration`` | ``inpainting`` | ``grayscale`` (see :mod:`.tasks`).
        batch_size: per device. num_workers, pin_memory, persistent_workers: DataLoader options
            (persistent workers only when ``num_workers > 0``).
        seed: degradation seed (see ``datasets`` for the scheme) and training-order seed (each
            epoch's order is a permutation from ``(seed, epoch)``, split over the ranks and resumed
            mid-epoch from checkpoints: :class:`~.loaders.ResumableLoader`). Validation samples are
            drawn once from it (no flip, independent of the epoch) so validation numbers compare
            across runs.
        latent_codes: precomputed target codes file (``codeformer-latent-codes``) of the training
            faces; validation samples carry no ``codes``.
        paired_small_large: stage III pairs (``lq`` small, ``lq_large`` = ``large_degradation``).
        file_list: text file of paths relative to ``train_dir`` to use (default: all images).
        on_wrong_size: ``resize`` (warn once per file) or ``error`` (skip the file, with a warning).
        use_hflip: random horizontal flip of training faces (with the matching codes).
        val_batch_size: default ``batch_size``.
        gpu_degradation: degrade training batches on the training device after transfer
            (:mod:`.gpu_degradations`; restoration only; JPEG approximated) instead of in the
            workers; validation keeps the fixed numpy degradations. Draws are seeded from
            (seed, global rank, training batches degraded so far in this run: saved in checkpoints).
    """

    def __init__(
        self,
        train_dir: str | os.PathLike | None = None,
        val_dir: str | os.PathLike | None = None,
        train_lmdb: str | os.PathLike | None = None,
        val_lmdb: str | os.PathLike | None = None,
        image_size: int = 512,
        degradation: str | DegradationConfig = "stage2",
        task: str = "restoration",
        val_split: int = 100,
        batch_size: int = 4,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        latent_codes: str | os.PathLike | None = None,
        paired_small_large: bool = False,
        large_degradation: str | DegradationConfig = "stage3_large",
        file_list: str | os.PathLike | None = None,
        on_wrong_size: str = "resize",
        use_hflip: bool = True,
        val_batch_size: int | None = None,
        gpu_degradation: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(degradation, DegradationConfig) and degradation not in PRESETS:
            raise ValueError(f"unknown degradation {degradation!r}; valid presets: {', '.join(PRESETS)}")
        preset(large_degradation)
        check_task(task)
        if gpu_degradation and task != "restoration":
            raise ValueError(f"gpu_degradation supports task 'restoration' only, got {task!r}")
        self._check_sources(train_dir, train_lmdb, val_dir, val_lmdb)
        if int(batch_size) < 1 or int(num_workers) < 0 or int(val_split) < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, val_split >= 0; got {batch_size}, {num_workers}, {val_split}"
            )
        self.save_hyperparameters(logger=False)
        self.train_set: FaceDataset | None = None
        self.val_set: FaceDataset | None = None
        self._codes = None
        self._train_source = None
        self._train_idx: list[int] = []
        self._gpu_batches = 0
        self._loaders: dict[str, ReportingLoader] = {}

    # ------------------------------------------------------------------------- setup
    def _check_sources(self, train_dir, train_lmdb, val_dir, val_lmdb) -> None:
        """One training source, at most one validation source (data modules of other sources override it)."""
        if (train_dir is None) == (train_lmdb is None):
            raise ValueError(
                "give exactly one of train_dir (a folder of aligned faces) and train_lmdb (codeformer-pack-lmdb output); "
                f"got train_dir={train_dir!r}, train_lmdb={train_lmdb!r}"
            )
        if val_dir is not None and val_lmdb is not None:
            raise ValueError("give at most one of val_dir and val_lmdb")

    def _source(self, folder, lmdb_path, file_list=None):
        if lmdb_path is not None:
            from .lmdb import LmdbSource

            return LmdbSource(lmdb_path)
        return ImageFolderSource(folder, file_list)

    def _dataset(self, source, indices, fixed: bool) -> FaceDataset:
        hp = self.hparams
        on_device = hp.gpu_degradation and not fixed  # workers then only load, flip and pair
        return FaceDataset(
            source,
            hp.image_size,
            "none" if on_device else hp.degradation,
            hp.task,
            seed=hp.seed,
            fixed=fixed,
            use_hflip=hp.use_hflip,
            latent_codes=None if fixed else self._codes,
            paired_small_large=hp.paired_small_large,
            large_degradation="none" if on_device else hp.large_degradation,
            on_wrong_size=hp.on_wrong_size,
            indices=indices,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._train_source is None:
            if hp.latent_codes is not None:
                self._codes = read_latent_codes(hp.latent_codes)
            source = self._source(hp.train_dir, hp.train_lmdb, hp.file_list)
            train_idx = list(range(len(source)))
            if hp.val_dir is not None or hp.val_lmdb is not None:
                self.val_set = self._dataset(self._source(hp.val_dir, hp.val_lmdb), None, fixed=True)
            elif hp.val_split > 0:
                if hp.val_split >= len(source):
                    raise ValueError(
                        f"val_split={hp.val_split} leaves no training faces: the training set has only {len(source)}"
                    )
                # a fixed choice from the seed, independent of everything else
                held = set(
                    np.random.default_rng([int(hp.seed), 7])
                    .choice(len(source), hp.val_split, replace=False)
                    .tolist()
                )
                self.val_set = self._dataset(source, sorted(held), fixed=True)
                train_idx = [i for i in train_idx if i not in held]
            self._train_source, self._train_idx = source, train_idx
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(self._train_source, self._train_idx, fixed=False)
            self._attach_callback()

    def _attach_callback(self) -> None:
        # the epoch must reach the dataset at every epoch start: the data module has no such hook
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not any(isinstance(cb, DataEpochCallback) for cb in trainer.callbacks):
            trainer.callbacks.append(DataEpochCallback())

    # ------------------------------------------------------------------------- loaders
    def _loader_options(self) -> dict:
        workers = int(self.hparams.num_workers)
        return dict(
            num_workers=workers,
            pin_memory=bool(self.hparams.pin_memory) and torch.cuda.is_available(),
            persistent_workers=bool(self.hparams.persistent_workers) and workers > 0,
        )

    def train_dataloader(self) -> ResumableLoader:
        """This rank's share of every epoch in a seeded order that checkpoints resume exactly
        (:class:`~.loaders.ResumableLoader`; the samples of each epoch are split over the ranks)."""
        if self.train_set is None:
            self.setup("fit")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # a resumed run starts mid-way: its first epoch's samples (the checkpoint's position follows)
        epoch = trainer.current_epoch if trainer is not None else self.train_set.epoch
        seed = int(self.hparams.seed)
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, seed=seed, epoch=epoch)
        # full batches (BatchNorm-free nets would not mind, GAN stats do)
        drop_last = len(sampler) >= self.hparams.batch_size
        options = dict(sampler=sampler, drop_last=drop_last, **self._loader_options())
        position = self._position if trainer is not None else None
        loader = ResumableLoader(self.train_set, self.hparams.batch_size, position=position, **options)
        self._loaders["train"] = loader
        return loader

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it consumed) of the training loop; a finished epoch is the next one's start."""
        trainer = self.trainer
        epoch, batches = trainer.current_epoch, trainer.fit_loop.batch_idx + 1
        if batches >= trainer.num_training_batches:
            return epoch + 1, 0
        return epoch, max(batches, 0)

    def val_dataloader(self) -> ReportingLoader | list:
        if self._train_source is None:
            self.setup("validate")
        if self.val_set is None:
            warnings.warn("no validation faces (val_dir/val_lmdb not given and val_split=0)", stacklevel=2)
            return []
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        loader = ReportingLoader(self.val_set, batch_size=batch_size, shuffle=False, **self._loader_options())
        self._loaders["val"] = loader
        return loader

    def on_exception(self, exception: BaseException) -> None:
        # torch reports a worker killed while the main process was busy elsewhere without the file
        # it was loading (the loaders name it when they see the failure themselves)
        for name, loader in self._loaders.items():
            report = loader.loading_report(exception) if "DataLoader worker" in str(exception) else None
            if report:
                log.error("%s loader: %s", name, report)

    def state_dict(self) -> dict[str, int]:
        # the GPU-degradation draws continue where the checkpoint stopped (the data order and position
        # are the train loader's state)
        return {"gpu_batches": self._gpu_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._gpu_batches = int(state_dict.get("gpu_batches", 0))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if (
            not self.hparams.gpu_degradation
            or trainer is None
            or not trainer.training
            or not isinstance(batch, dict)
        ):
            return batch
        from .gpu_degradations import degrade_batch

        gt = batch["gt"]
        state = np.random.SeedSequence([int(self.hparams.seed), int(trainer.global_rank), self._gpu_batches])
        self._gpu_batches += 1
        gen = torch.Generator(device=gt.device).manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
        batch["lq"], _ = degrade_batch(gt, self.hparams.degradation, gen)
        if "lq_large" in batch:
            batch["lq_large"], _ = degrade_batch(gt, self.hparams.large_degradation, gen)
        return batch

    def set_epoch(self, epoch: int) -> None:
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

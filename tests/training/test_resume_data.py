"""Resumable data order and worker reporting (issue 14): the sampler and loader on their own, then
FaceDataModule inside real Trainer runs stopped at a checkpoint and resumed, with 0 and 2 workers.
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from codeformer_lightning.data import BadImageWarning, FaceDataModule, FaceDataset, ImageFolderSource
from codeformer_lightning.data.loaders import (
    DataLoaderWorkerError,
    ReportingLoader,
    ResumableLoader,
    ResumableSampler,
)
from codeformer_lightning.training import RandomStateCheckpoint


def write_faces(folder: Path, count: int, size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"face_{i:02d}.png")
        names.append(f"face_{i:02d}")
    return names


# ----------------------------------------------------------------------------- sampler and loader
def test_epoch_order_comes_from_seed_and_epoch_and_ranks_share_it_without_overlap():
    data = list(range(11))
    sampler = ResumableSampler(data, seed=3, epoch=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == data and sorted(second) == data and first != second
    assert list(ResumableSampler(data, seed=3, epoch=1)) == second  # no global random state involved
    assert list(ResumableSampler(data, seed=4, epoch=1)) != second
    ranks = [list(ResumableSampler(data, num_replicas=3, rank=r, seed=3, epoch=1)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # 11 padded to 12 by wrapping around
    interleaved = [ranks[r][j] for j in range(4) for r in range(3)]
    assert interleaved == second + second[:1]  # rank r takes samples r, r+3, ...: no overlap before the pad


def test_resumed_sampler_continues_every_rank_after_the_consumed_samples():
    data = list(range(11))
    full = [list(ResumableSampler(data, num_replicas=3, rank=r, seed=0, epoch=2)) for r in range(3)]
    for r in range(3):
        sampler = ResumableSampler(data, num_replicas=3, rank=r, seed=0, epoch=0)
        sampler.resume(2, consumed=6)  # 2 batches of 1 on each of 3 ranks
        assert len(sampler) == 4  # the fit loop counts the resumed epoch in full
        assert list(sampler) == full[r][2:]
        assert list(sampler) == full[r]  # the skip applies to one pass only
    ds = FaceDataset(_Names(5), 8, "none")
    ResumableSampler(ds, epoch=0).resume(3, 2)
    assert ds.epoch == 3  # the dataset's degradations follow the sampler's epoch


class _Names:
    """A tiny image source for FaceDataset (unused pixels)."""

    def __init__(self, n: int) -> None:
        self.names = [f"s{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        return self.names[index]


def test_loader_state_names_the_consumed_samples_and_restores_them():
    data = list(range(20))
    position = (1, 3)  # the trainer's view: epoch 1, 3 batches consumed (whatever was prefetched)
    loader = ResumableLoader(data, 2, sampler=ResumableSampler(data, seed=5), position=lambda: position)
    state = loader.state_dict()
    assert state == {
        "epoch": 1,
        "consumed": 6,
        "batch_size": 2,
        "world_size": 1,
        "dataset_size": 20,
        "seed": 5,
    }
    fresh = ResumableLoader(data, 2, sampler=ResumableSampler(data, seed=5, epoch=0))
    fresh.load_state_dict(state)
    order = ResumableSampler(data, seed=5, epoch=1).epoch_order()
    assert torch.cat(list(fresh)).tolist() == order[6:]
    assert len(fresh) == 10
    other = ResumableLoader(list(range(21)), 2, sampler=ResumableSampler(list(range(21)), seed=5))
    with pytest.warns(UserWarning, match="cannot continue, epoch 1 starts over"):
        other.load_state_dict(state)
    assert len(torch.cat(list(other))) == 21


# ----------------------------------------------------------------------------- inside the fit loop
class _Recorder(pl.LightningModule):
    """Records what each training step sees: epoch, sample names, a pixel checksum of the degraded
    inputs (they depend on the epoch), and draws from the global torch / numpy generators (the
    training stream that a resume must continue). Validation draws too (it must not matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        draws = (float(torch.rand(())), float(np.random.rand()))
        self.seen.append(
            (self.current_epoch, tuple(batch["name"]), round(float(batch["lq"].sum()), 3), draws)
        )
        return (self.w - batch["gt"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        torch.rand(5)
        np.random.rand(5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SaveAfterValidation(pl.Callback):
    """Saves ``path`` at the end of the first validation run (as a best-metric checkpoint would)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and not self.path.exists():
            trainer.save_checkpoint(self.path)


def _fit(
    folder: Path, workers: int, max_steps: int, ckpt_dir: Path | None = None, every: int = 0, resume=None
):
    """``every`` > 0: checkpoints every ``every`` steps; 0: one checkpoint after the first validation."""
    pl.seed_everything(0, workers=True)
    dm = FaceDataModule(
        train_dir=str(folder), image_size=32, degradation="stage3_small", val_split=2, batch_size=2,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=False, seed=0,
    )  # fmt: skip
    callbacks: list = [RandomStateCheckpoint()]
    if ckpt_dir is not None and every == 0:
        callbacks.append(_SaveAfterValidation(ckpt_dir / "after_validation.ckpt"))
    elif ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=every,
                                         save_top_k=-1, auto_insert_metric_name=False))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks, val_check_interval=3,
        default_root_dir=ckpt_dir or folder.parent,  # never the working directory
        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    module = _Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|num_workers|LeafSpec|litlogger).*")
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module.seen


@pytest.mark.parametrize(
    ("workers", "stop_at"),
    [(0, 3), (2, 4), pytest.param(2, 3, marks=pytest.mark.slow), pytest.param(0, 4, marks=pytest.mark.slow)],
)
def test_fit_resumed_from_a_checkpoint_sees_exactly_the_uninterrupted_batches(tmp_path, workers, stop_at):
    """10 faces, 2 held out, batches of 2: 4 steps per epoch. Step 3 is mid-epoch (and followed by a
    validation the resumed run skips), step 4 ends an epoch; 10 steps cross two epoch boundaries."""
    folder = tmp_path / "faces"
    write_faces(folder, 10)
    reference = _fit(folder, 0, 10)
    first = _fit(folder, workers, stop_at, tmp_path / "ckpt", every=stop_at)
    resumed = _fit(folder, workers, 10, resume=str(tmp_path / "ckpt" / f"step{stop_at}.ckpt"))
    assert first + resumed == reference
    assert {epoch for epoch, *_ in reference} == {0, 1, 2}


def test_fit_resumed_from_a_checkpoint_taken_after_validation_continues_exactly(tmp_path):
    """A checkpoint written at the end of the validation after step 3 (where best-metric and
    preemption checkpoints are taken) resumes like one written at the end of the step."""
    folder = tmp_path / "faces"
    write_faces(folder, 10)
    reference = _fit(folder, 0, 10)
    first = _fit(folder, 0, 4, tmp_path / "ckpt")
    resumed = _fit(folder, 0, 10, resume=str(tmp_path / "ckpt" / "after_validation.ckpt"))
    assert first[:3] + resumed == reference


def test_datamodule_state_holds_the_gpu_degradation_count(tmp_path):
    write_faces(tmp_path / "faces", 4)
    dm = FaceDataModule(
        train_dir=str(tmp_path / "faces"), image_size=32, val_split=0, num_workers=0, gpu_degradation=True
    )
    dm._gpu_batches = 7
    other = FaceDataModule(train_dir=str(tmp_path / "faces"), image_size=32, val_split=0, num_workers=0)
    other.load_state_dict(dm.state_dict())
    assert other._gpu_batches == 7


# ----------------------------------------------------------------------------- workers report like the main process
def _loader_batches(dataset, workers: int, caught: list):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        batches = list(ReportingLoader(dataset, batch_size=2, num_workers=workers))
    caught.extend(str(w.message) for w in record if issubclass(w.category, BadImageWarning))
    return batches


def test_corrupt_file_in_a_worker_is_skipped_named_and_replaced_as_in_the_main_process(tmp_path):
    folder = tmp_path / "faces"
    write_faces(folder, 5)
    (folder / "face_02.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # a corrupt file
    main_warnings: list[str] = []
    worker_warnings: list[str] = []
    main = _loader_batches(FaceDataset(ImageFolderSource(folder), 32, "stage2"), 0, main_warnings)
    in_workers = _loader_batches(FaceDataset(ImageFolderSource(folder), 32, "stage2"), 2, worker_warnings)
    assert len(main_warnings) == 1 and "face_02.png" in main_warnings[0] and "skipped" in main_warnings[0]
    assert worker_warnings == main_warnings  # raised in the main process, once
    for a, b in zip(main, in_workers, strict=True):
        assert a["name"] == b["name"] and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    assert "face_02" not in [n for batch in in_workers for n in batch["name"]]  # replaced by the next image


class _FatalSource(ImageFolderSource):
    """Reading ``face_03.png`` kills the worker process (as an out-of-memory kill would), or raises."""

    def __init__(self, folder: Path, mode: str) -> None:
        super().__init__(folder)
        self.mode = mode

    def read_bytes(self, index: int) -> bytes:
        if self.names[index] == "face_03":
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("decoder crashed")
        return super().read_bytes(index)


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_failed_worker_is_reported_with_the_file_it_was_reading(tmp_path, mode):
    folder = tmp_path / "faces"
    write_faces(folder, 6)
    loader = ReportingLoader(FaceDataset(_FatalSource(folder, mode), 32, "none"), batch_size=2, num_workers=2)
    with pytest.raises(DataLoaderWorkerError) as failure:
        list(loader)
    text = str(failure.value)
    assert "was loading sample 3" in text and str(folder / "face_03.png") in text
    assert (
        ("killed by signal" in text or "exited unexpectedly" in text)
        if mode == "kill"
        else "decoder crashed" in text
    )

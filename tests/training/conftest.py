"""Tiny fixtures for the training-stage tests: synthetic faces, tiny networks, a quick Trainer.

Fixtures (use them from any test under tests/training/):

* ``synthetic_faces(n, size, seed=0) -> (n,3,size,size) in [-1,1]`` (a function) and ``faces32``
  (8 faces, 32 px);
* ``make_loader(images, length=None, batch_size=None)``: a deterministic DataLoader of
  ``{"lq", "gt"}`` dict batches (by default the same fixed batch over and over);
* ``make_trainer(max_steps, **trainer_kwargs)``: a quiet CPU Trainer;
* ``loss_recorder``: a callback collecting ``pl_module.last_logs`` after every batch;
* ``tiny_ae32_config`` / ``tiny_ae64_config``, ``tiny_vqgan(size=32, disc=True, lr=1e-3, **kwargs)``.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from codeformer_lightning.losses import VQGANLoss
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.nn import PatchDiscriminator, VQAutoEncoder
from codeformer_lightning.quickstart import cached_face_folder

TINY_AE_32 = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,),
                  codebook_size=64, emb_dim=32, norm_groups=8)
TINY_AE_64 = dict(TINY_AE_32, img_size=64, attn_resolutions=(8,))
TINY_DISC = dict(ndf=16, n_layers=2)


def _synthetic_faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth cartoon faces ``(n, 3, size, size)`` in [-1, 1]: background gradient, skin ellipse,
    two eyes, a mouth, each with random colour/position jitter (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        bg = rnd(3, 1, 1) * (0.6 + 0.4 * ys) + rnd(3, 1, 1, hi=0.3) * xs
        cx, cy, rx, ry = rnd(1, lo=-0.1, hi=0.1), rnd(1, lo=-0.1, hi=0.1), rnd(1, lo=0.5, hi=0.7), rnd(1, lo=0.65, hi=0.85)
        face = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1).float()
        skin = torch.tensor([0.9, 0.7, 0.55]).view(3, 1, 1) * rnd(1, lo=0.6, hi=1.1)
        img = bg * (1 - face) + skin * face
        for side in (-1, 1):
            ex, ey = cx + side * rnd(1, lo=0.2, hi=0.3), cy - rnd(1, lo=0.15, hi=0.25)
            eye = torch.exp(-(((xs - ex) ** 2 + (ys - ey) ** 2) / 0.006))
            img = img * (1 - eye) + rnd(3, 1, 1, hi=0.3) * eye
        my = cy + rnd(1, lo=0.3, hi=0.4)
        mouth = torch.exp(-(((xs - cx) / 0.25) ** 2 + ((ys - my) / 0.05) ** 2))
        img = img * (1 - mouth) + torch.tensor([0.6, 0.1, 0.15]).view(3, 1, 1) * mouth
        out.append(img.clamp(0, 1) * 2 - 1)
    return torch.stack(out)


class _Repeat(Dataset):
    def __init__(self, images: torch.Tensor, length: int) -> None:
        self.images, self.length = images, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        img = self.images[i % len(self.images)]
        return {"lq": img, "gt": img}


def _loader(images: torch.Tensor, length: int | None = None, batch_size: int | None = None) -> DataLoader:
    """Deterministic loader over ``images`` (dict batches like FaceDataModule's); with the defaults every
    batch is the same fixed batch."""
    batch_size = batch_size or len(images)
    return DataLoader(_Repeat(images, length or batch_size * 10_000), batch_size=batch_size, shuffle=False)


def _trainer(max_steps: int, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer for tests."""
    opts = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, deterministic=False)
    opts.update(kwargs)
    return pl.Trainer(**opts)


class LossRecorder(pl.Callback):
    """Records ``pl_module.last_logs`` (floats) after every training batch."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logs.append({k: float(v) for k, v in pl_module.last_logs.items()})

    def series(self, key: str) -> list[float]:
        return [d[key] for d in self.logs if key in d]


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|val_dataloader|num_workers|LeafSpec|litlogger).*")
        yield


@pytest.fixture
def tiny_vqgan():
    """Factory: ``tiny_vqgan(size=32, disc=True, lr=1e-3, **module_kwargs) -> VQGANModule``.

    No LPIPS; the discriminator stays off unless ``disc_start_step`` is given; Adam(lr) for both.
    """

    def make(size: int = 32, disc: bool = True, lr: float = 1e-3, loss: VQGANLoss | None = None, **kwargs) -> VQGANModule:
        net = VQAutoEncoder(**(TINY_AE_32 if size == 32 else TINY_AE_64))
        kwargs.setdefault("disc_start_step", 10**9)
        kwargs.setdefault("optimizer", partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99)))
        kwargs.setdefault("d_optimizer", partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99)))
        return VQGANModule(
            net, PatchDiscriminator(**TINY_DISC) if disc else None, loss or VQGANLoss(perceptual_weight=0.0), **kwargs
        )

    return make


@pytest.fixture
def synthetic_faces():
    return _synthetic_faces


@pytest.fixture
def faces32() -> torch.Tensor:
    return _synthetic_faces(8, 32)


@pytest.fixture
def make_loader():
    return _loader


@pytest.fixture
def make_trainer():
    return _trainer


@pytest.fixture
def loss_recorder() -> LossRecorder:
    return LossRecorder()


@pytest.fixture
def tiny_ae32_config() -> dict:
    return dict(TINY_AE_32)


@pytest.fixture
def tiny_ae64_config() -> dict:
    return dict(TINY_AE_64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` of the quickstart faces (32 px), for the command-line training runs."""
    root = tmp_path_factory.mktemp("data")
    cached_face_folder(root / "quickstart_faces", size=32)  # where data=sample_faces looks for it
    return root

"""Non-finite steps (issue 14): a NaN batch injected into each stage is skipped (no optimiser step,
no EMA or codebook update, BatchNorm statistics untouched), counted and logged, and too many in a
row stop the run with an error naming the step and the loss terms."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from codeformer_lightning import save_weights
from codeformer_lightning.losses import VQGANLoss
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.models.cft import CFTModule
from codeformer_lightning.models.code_predictor import CodePredictorModule
from codeformer_lightning.nn import CodeFormer, PatchDiscriminator, VQAutoEncoder
from codeformer_lightning.training import NonFiniteLossError

AE = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=1, attn_resolutions=(4,), codebook_size=64,
          emb_dim=32, norm_groups=8)  # fmt: skip
CF = dict(AE, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))
DISC = dict(ndf=16, n_layers=2)
ADAM = partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.99))
BATCH = 2


class Faces(Dataset):
    """``{"lq", "gt"}`` samples; the samples of the batches in ``nan_batches`` are NaN."""

    def __init__(self, images: torch.Tensor, length: int, nan_batches: set[int]) -> None:
        self.images, self.length, self.nan_batches = images, length, nan_batches

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        img = self.images[i % len(self.images)].clone()
        if i // BATCH in self.nan_batches:
            img.fill_(float("nan"))
        return {"lq": img, "gt": img}


class Snapshots(pl.Callback):
    """The module's full state (weights, buffers, EMA) and the optimisers' states after each batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.optim_steps: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        steps = []
        for opt in trainer.optimizers:
            steps += [float(s["step"]) for s in opt.state.values() if "step" in s]
        self.optim_steps.append(steps)


def _same(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k]) and not (a[k].isnan().all() and b[k].isnan().all())]


def _fit(
    module, steps: int, nan_batches: set[int], tmp_path, synthetic_faces
) -> tuple[Snapshots, list[dict]]:
    snaps = Snapshots()
    logger = CSVLogger(tmp_path, name="log")
    loader = DataLoader(Faces(synthetic_faces(4, 32), steps * BATCH, nan_batches), batch_size=BATCH)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[snaps], log_every_n_steps=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, loader)
    import csv

    rows = [
        r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("train/nonfinite_steps")
    ]
    return snaps, rows


@pytest.fixture
def autoencoder_file(tmp_path):
    torch.manual_seed(3)
    return str(save_weights(VQAutoEncoder(**AE), tmp_path / "stage1.safetensors"))


def _vqgan(**kw):
    torch.manual_seed(0)
    return VQGANModule(VQAutoEncoder(**AE), PatchDiscriminator(**DISC), VQGANLoss(perceptual_weight=0.0),
                       optimizer=ADAM, d_optimizer=ADAM, disc_start_step=0, kmeans_init=True,
                       kmeans_min_samples=32, dead_code_steps=2, ema_decay=0.9, **kw)  # fmt: skip


def _code_predictor(autoencoder_file, **kw):
    torch.manual_seed(0)
    return CodePredictorModule(
        CodeFormer(**CF), optimizer=ADAM, autoencoder=autoencoder_file, ema_decay=0.9, **kw
    )


def _cft(autoencoder_file, **kw):
    torch.manual_seed(0)
    return CFTModule(CodeFormer(**CF), PatchDiscriminator(**DISC), optimizer=ADAM, d_optimizer=ADAM,
                     autoencoder=autoencoder_file, discriminator_from="random", perceptual_weight=0.0, disc_start_step=0,
                     ema_decay=0.9,
                     **kw)  # fmt: skip


STAGES = {"vqgan": lambda ae: _vqgan(), "code_predictor": _code_predictor, "cft": _cft}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_nan_batch_is_skipped_counted_and_logged(stage, autoencoder_file, tmp_path, synthetic_faces):
    module = STAGES[stage](autoencoder_file)
    snaps, rows = _fit(module, 4, {2}, tmp_path, synthetic_faces)
    before, nan_step, after = snaps.states[1], snaps.states[2], snaps.states[3]
    changed = _same(before, nan_step)
    assert not changed, (
        f"the NaN step changed {changed[:5]}"
    )  # weights, EMA, BatchNorm stats, codebook buffers
    assert not any(v.is_floating_point() and not v.isfinite().all() for v in after.values())
    assert _same(nan_step, after)  # the next finite step trains again
    assert snaps.optim_steps[1] == snaps.optim_steps[2] != snaps.optim_steps[3]  # Adam never stepped
    assert module.trainer.global_step == 4  # the skipped step still counts as a step
    assert module.nonfinite.total == 1 and module.nonfinite.consecutive == 0
    logged = [float(r["train/nonfinite_steps"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
    assert logged == [0, 0, 1, 1]  # after each of the 4 steps


@pytest.mark.parametrize("stage", list(STAGES))
def test_too_many_consecutive_nonfinite_steps_stop_with_the_step_and_terms(
    stage, autoencoder_file, tmp_path, synthetic_faces
):
    module = (
        STAGES[stage](autoencoder_file, max_nonfinite_steps=3)
        if stage != "vqgan"
        else _vqgan(max_nonfinite_steps=3)
    )
    term = {"vqgan": "l1", "code_predictor": "feat", "cft": "l1"}[stage]
    with pytest.raises(NonFiniteLossError, match=rf"step 3: non-finite .*{term}.*3 consecutive") as err:
        _fit(module, 6, {1, 2, 3}, tmp_path, synthetic_faces)  # batches 1-3 NaN: the 3rd in a row stops
    assert "max_nonfinite_steps=3" in str(err.value)


def test_guard_counters_are_saved_in_checkpoints(tmp_path):
    module = _vqgan()
    module.nonfinite.consecutive, module.nonfinite.total = 2, 5
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    other = _vqgan()
    other.on_load_checkpoint(ckpt)
    assert (other.nonfinite.consecutive, other.nonfinite.total) == (2, 5)
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1"):
        _vqgan(max_nonfinite_steps=0)

"""Stage I (VQGANModule): learning, GAN schedule, EMA, precision, accumulation, clipping, resume, export."""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision
from torchmetrics.functional.image import peak_signal_noise_ratio

from codeformer_lightning import load_pretrained, save_weights
from codeformer_lightning.losses import VQGANLoss
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder
from codeformer_lightning.training import ExportWeights, image_grid


class _Snapshots(pl.Callback):
    """State dicts of one submodule after every training batch."""

    def __init__(self, attr: str) -> None:
        self.attr, self.states = attr, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        sub = getattr(pl_module, self.attr)
        self.states.append({k: v.detach().clone() for k, v in sub.state_dict().items()})


class _Recorder(pl.Callback):
    """``pl_module.last_logs`` as floats after every training batch."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.logs.append({k: float(v) for k, v in pl_module.last_logs.items()})


def _params_equal(a: dict, b: dict, keys=None) -> bool:
    keys = keys or a.keys()
    return all(torch.equal(a[k], b[k]) for k in keys)


def _fit_and_record_l1(module, loader, steps, make_trainer, loss_recorder, **trainer_kwargs) -> list[float]:
    make_trainer(steps, callbacks=[loss_recorder, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs).fit(module, loader)
    return loss_recorder.series("l1")


def _assert_falls(l1: list[float], factor: float) -> None:
    tail = sum(l1[-10:]) / 10
    assert all(map(lambda v: v == v and abs(v) != float("inf"), l1)), "non-finite loss"
    assert tail < factor * l1[0], f"L1 {l1[0]:.3f} -> {tail:.3f} (wanted < {factor} x)"


# ----------------------------------------------------------------------------- learning + logging
def test_reconstruction_loss_falls_on_a_fixed_batch_and_usage_is_logged(
    tmp_path, tiny_vqgan, synthetic_faces, make_loader, make_trainer, loss_recorder
):
    steps = 200
    module = tiny_vqgan(disc=False, lr=2e-3, sample_every_n_steps=100)
    x = synthetic_faces(4, 32)
    logger = CSVLogger(tmp_path, name="run")
    l1 = _fit_and_record_l1(module, make_loader(x, length=4 * steps), steps, make_trainer, loss_recorder,
                            logger=logger, log_every_n_steps=1)
    _assert_falls(l1, 0.3)
    assert loss_recorder.series("code_usage")[-1] > 0 and loss_recorder.series("perplexity")[-1] > 1

    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    epoch = next(r for r in rows if r.get("train/epoch_code_usage"))
    usage, dead = float(epoch["train/epoch_code_usage"]), float(epoch["train/epoch_dead_codes"])
    assert 0 < usage <= 1 and dead == pytest.approx(64 * (1 - usage))
    assert float(epoch["train/epoch_perplexity"]) > 1
    assert any(r.get("train/perplexity") for r in rows) and any(r.get("train/l1") for r in rows)
    from PIL import Image

    grids = sorted((Path(logger.log_dir) / "images").glob("train_samples_step*.png"))
    # named by the steps completed, as the metrics and checkpoints (models/stage.py)
    assert [g.name for g in grids] == ["train_samples_step0000100.png", "train_samples_step0000200.png"]
    assert Image.open(grids[0]).size == (2 * 32, 4 * 32)  # (input | reconstruction) x 4 samples


@pytest.mark.slow
def test_reconstruction_loss_falls_at_64px(tiny_vqgan, synthetic_faces, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(size=64, disc=False, lr=2e-3)
    l1 = _fit_and_record_l1(module, make_loader(synthetic_faces(4, 64)), 300, make_trainer, loss_recorder)
    _assert_falls(l1, 0.3)


def test_image_grid_layout():
    a, b = -torch.ones(3, 3, 4, 5), torch.ones(3, 3, 4, 5) * 3
    grid = image_grid([a, b], max_rows=2)
    assert grid.shape == (3, 2 * 4, 2 * 5)
    assert grid[:, :, :5].eq(0).all() and grid[:, :, 5:].eq(1).all()  # clamped to [-1,1] -> [0,1]


# ----------------------------------------------------------------------------- GAN schedule and losses
def test_discriminator_starts_at_disc_start_step(tiny_vqgan, faces32, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(disc_start_step=3)
    initial = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    snaps = _Snapshots("discriminator")
    trainer = make_trainer(6, callbacks=[loss_recorder, snaps])
    trainer.fit(module, make_loader(faces32[:4]))
    assert trainer.global_step == 6  # generator steps only, although the discriminator stepped too
    assert [_params_equal(s, initial) for s in snaps.states] == [True, True, True, False, False, False]
    assert not _params_equal(snaps.states[4], snaps.states[5])
    assert ["gan_g" in log for log in loss_recorder.logs] == [False] * 3 + [True] * 3
    assert ["d_loss" in log for log in loss_recorder.logs] == [False] * 3 + [True] * 3


@pytest.mark.parametrize("frozen", ["generator", "discriminator"])
def test_each_step_updates_only_its_own_network(frozen, tiny_vqgan, faces32, make_loader, make_trainer):
    zero_lr = partial(torch.optim.Adam, lr=0.0)
    kwargs = {"optimizer": zero_lr} if frozen == "generator" else {"d_optimizer": zero_lr}
    module = tiny_vqgan(disc_start_step=0, **kwargs)
    g0 = {k: v.clone() for k, v in module.net.named_parameters()}
    d0 = {k: v.clone() for k, v in module.discriminator.named_parameters()}
    make_trainer(2).fit(module, make_loader(faces32[:4]))
    g_same = _params_equal(dict(module.net.named_parameters()), g0)
    d_same = _params_equal(dict(module.discriminator.named_parameters()), d0)
    # with the other network's lr at 0 its weights must not move: no cross-talk between the two steps
    assert (g_same, d_same) == ((True, False) if frozen == "generator" else (False, True))


def test_adaptive_weight_is_the_clamped_gradient_norm_ratio():
    last = torch.nn.Parameter(torch.randn(4, 3))
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec = (last * a).sum()
    fake_logits = -(last * b)  # hinge_g = -mean(fake) = mean(last * b): gradient b / 12
    ratio = a.norm() / (b.norm() / 12 + 1e-4)
    loss = VQGANLoss(perceptual_weight=0, gan_weight=0.8, adaptive_weight_max=1e9)
    term, logs = loss.gan_term(rec, fake_logits, last)
    torch.testing.assert_close(logs["adaptive_weight"], ratio)
    torch.testing.assert_close(term, 0.8 * ratio * (last * b).mean())
    _, logs = VQGANLoss(perceptual_weight=0, adaptive_weight_max=0.01).gan_term(rec, fake_logits, last)
    assert logs["adaptive_weight"].item() == pytest.approx(0.01)
    _, logs = VQGANLoss(perceptual_weight=0, adaptive_weight=False).gan_term(rec, fake_logits, last)
    assert logs["adaptive_weight"].item() == 1.0
    nan_rec = rec * float("nan")  # fp16 overflow: the weight falls back to 0 instead of poisoning the step
    _, logs = loss.gan_term(nan_rec, fake_logits, last)
    assert logs["adaptive_weight"].item() == 0.0


def test_logged_generator_total_is_the_weighted_sum(tiny_vqgan, faces32, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(disc_start_step=0)
    make_trainer(2, callbacks=[loss_recorder]).fit(module, make_loader(faces32[:4]))
    for log in loss_recorder.logs:
        assert 0 <= log["adaptive_weight"] <= 1
        expected = log["l1"] + log["codebook"] + 0.8 * log["adaptive_weight"] * log["gan_g"]
        assert log["total"] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- EMA, validation, export
def test_ema_tracks_live_weights_and_serves_validation_and_export(
    tmp_path, tiny_vqgan, faces32, make_loader, make_trainer
):
    module = tiny_vqgan(disc=False, ema_decay=0.5)
    expected = {k: v.clone() for k, v in module.net.state_dict().items()}
    snaps = _Snapshots("net")
    export = tmp_path / "vqgan_ema.safetensors"
    x = faces32[:4]
    trainer = make_trainer(3, callbacks=[snaps, ExportWeights(export)], limit_val_batches=1.0)
    trainer.fit(module, make_loader(x))
    for live in snaps.states:
        expected = {k: 0.5 * expected[k] + 0.5 * live[k] for k in expected}
    ema_state = module.ema.module.state_dict()
    assert all(torch.allclose(ema_state[k], expected[k], atol=1e-6) for k in expected)
    assert int(module.ema.num_updates) == 3

    metrics = trainer.validate(module, make_loader(x, length=4), verbose=False)[0]
    with torch.no_grad():
        ema_recon = module.ema.module(x)[0].clamp(-1, 1)
        live_recon = module.net(x)[0].clamp(-1, 1)
    ema_psnr = peak_signal_noise_ratio((ema_recon + 1) / 2, (x + 1) / 2, data_range=1.0).item()
    live_psnr = peak_signal_noise_ratio((live_recon + 1) / 2, (x + 1) / 2, data_range=1.0).item()
    assert metrics["val/psnr"] == pytest.approx(ema_psnr, abs=1e-4) and abs(ema_psnr - live_psnr) > 1e-4

    loaded = load_pretrained(export)  # written by the ExportWeights callback at train end
    assert type(loaded) is VQAutoEncoder and loaded.config == module.ema.module.config
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], module.ema.module(x)[0])


def test_pretrained_weights_are_loaded_into_net_and_ema(tmp_path, tiny_ae32_config, tiny_cf_config):
    source = VQAutoEncoder(**tiny_ae32_config)
    path = save_weights(source, tmp_path / "ae.safetensors")
    module = VQGANModule(VQAutoEncoder(**tiny_ae32_config), None, VQGANLoss(perceptual_weight=0), pretrained=str(path))
    assert _params_equal(module.net.state_dict(), source.state_dict())
    assert _params_equal(module.ema.module.state_dict(), source.state_dict())
    cf = save_weights(CodeFormer(**tiny_cf_config), tmp_path / "cf.safetensors")
    with pytest.raises(ValueError, match="VQAutoEncoder"):
        VQGANModule(VQAutoEncoder(**tiny_ae32_config), None, VQGANLoss(perceptual_weight=0), pretrained=str(cf))


# ----------------------------------------------------------------------------- precision, accumulation, clipping
def test_bf16_mixed_precision_learns(tiny_vqgan, faces32, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(lr=2e-3, disc_start_step=40, grad_clip=1.0)
    l1 = _fit_and_record_l1(module, make_loader(faces32[:4]), 60, make_trainer, loss_recorder, precision="bf16-mixed")
    # Reconstruction must fall before the discriminator starts; once it does (step 40), the GAN term
    # legitimately pulls L1 back up at this learning rate, so the later steps are checked for finiteness.
    _assert_falls(l1[:40], 0.6)
    assert all(v == v and abs(v) != float("inf") for v in l1)
    assert all(v == v for v in loss_recorder.series("d_loss")) and len(loss_recorder.series("d_loss")) == 20


def _fp16_plugin() -> MixedPrecision:
    # On CPU, Trainer(precision="16-mixed") silently becomes bf16; this plugin forces fp16 + GradScaler,
    # the path GPUs take: scaled manual_backward, unscale before clipping, scaler-skipped steps.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))


@pytest.mark.slow  # fp16 convolutions on CPU are ~50x slower than fp32
def test_fp16_with_grad_scaler_learns(tiny_vqgan, faces32, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(lr=2e-3, disc_start_step=30, grad_clip=1.0)
    l1 = _fit_and_record_l1(module, make_loader(faces32[:4]), 40, make_trainer, loss_recorder, plugins=[_fp16_plugin()])
    _assert_falls(l1, 0.7)
    assert len(loss_recorder.series("d_loss")) == 10


def test_gradient_accumulation_equals_one_big_batch(tiny_vqgan, faces32, make_loader, make_trainer):
    sgd = partial(torch.optim.SGD, lr=0.1)
    torch.manual_seed(0)
    accumulated = tiny_vqgan(disc=False, optimizer=sgd, accumulate_grad_batches=2)
    torch.manual_seed(0)
    big = tiny_vqgan(disc=False, optimizer=sgd)
    init = {k: v.detach().clone() for k, v in big.net.named_parameters()}
    x = faces32[:4]
    t_acc = make_trainer(1)
    t_acc.fit(accumulated, make_loader(x, batch_size=2))  # two half batches, one step
    make_trainer(1).fit(big, make_loader(x))
    assert t_acc.global_step == 1 and int(accumulated.ema.num_updates) == 1
    a, b = dict(accumulated.net.named_parameters()), dict(big.net.named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.allclose(a["generator.conv_out.weight"], init["generator.conv_out.weight"], atol=1e-4)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-gradscaler"])
def test_gradient_clipping_bounds_the_step(fp16, tiny_vqgan, synthetic_faces, make_loader, make_trainer):
    x = synthetic_faces(1, 32)

    def step_size(clip):
        torch.manual_seed(0)
        module = tiny_vqgan(disc=False, optimizer=partial(torch.optim.SGD, lr=1.0), grad_clip=clip)
        before = torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])
        make_trainer(1, plugins=[_fp16_plugin()] if fp16 else None).fit(module, make_loader(x))
        return (torch.cat([p.detach().flatten() for p in module.net.parameters()]) - before).norm().item()

    # SGD with lr 1: the step is the clipped gradient. Under fp16 this only holds if the gradients
    # were unscaled before clipping (clipping scaled ones would give a step 1024x too small).
    assert step_size(1e-3) == pytest.approx(1e-3, rel=1e-2)
    if not fp16:
        assert step_size(None) > 1e-2


# ----------------------------------------------------------------------------- codebook options in the module
def test_codebook_options_in_the_module(tiny_vqgan, faces32, make_loader, make_trainer, loss_recorder):
    module = tiny_vqgan(disc=False, kmeans_init=True, kmeans_min_samples=64, dead_code_steps=2, codebook_ema_decay=0.9)
    weight = module.net.quantize.embedding.weight
    assert not weight.requires_grad
    trainer = make_trainer(6, callbacks=[loss_recorder])
    before = weight.detach().clone()
    trainer.fit(module, make_loader(faces32[:4]))
    assert all(weight is not p for g in trainer.optimizers[0].param_groups for p in g["params"])
    assert not torch.equal(weight.detach(), before) and bool(module.codebook.initialised)
    assert sum(loss_recorder.series("restarted_codes")) > 0


# ----------------------------------------------------------------------------- resume
def test_resume_gives_the_same_next_step(tmp_path, tiny_vqgan, faces32, make_loader, make_trainer):
    kwargs = dict(
        disc_start_step=2, ema_decay=0.9, kmeans_init=True, kmeans_min_samples=64, dead_code_steps=2,
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, T_0=3, eta_min=1e-4),
    )
    x = faces32[:4]
    torch.manual_seed(0)
    first = tiny_vqgan(**kwargs)
    rec1 = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    t1 = make_trainer(5, callbacks=[rec1, ckpt], enable_checkpointing=True)
    t1.fit(first, make_loader(x))
    path = tmp_path / "epoch=0-step=4.ckpt"
    assert path.is_file()

    torch.manual_seed(123)  # a differently initialised module: everything must come from the checkpoint
    second = tiny_vqgan(**kwargs)
    rec2 = _Recorder()
    t2 = make_trainer(5, callbacks=[rec2])
    t2.fit(second, make_loader(x), ckpt_path=path, weights_only=True)

    assert len(rec2.logs) == 1 and rec2.logs[0].keys() == rec1.logs[4].keys()
    for key, value in rec1.logs[4].items():
        assert rec2.logs[0][key] == pytest.approx(value, abs=1e-6), key
    s1, s2 = first.state_dict(), second.state_dict()  # net, EMA, discriminator, codebook upkeep
    assert s1.keys() == s2.keys() and all(torch.allclose(s1[k].float(), s2[k].float(), atol=1e-6) for k in s1)
    for o1, o2 in zip(t1.optimizers, t2.optimizers):
        st1, st2 = o1.state_dict()["state"], o2.state_dict()["state"]
        assert st1.keys() == st2.keys()
        assert all(torch.allclose(st1[i][n], st2[i][n], atol=1e-6) for i in st1 for n in st1[i])
    assert [c.scheduler.last_epoch for c in t1.lr_scheduler_configs] == [5, 5]
    assert [c.scheduler.last_epoch for c in t2.lr_scheduler_configs] == [5, 5]


# ----------------------------------------------------------------------------- distributed (slow)
class _RankReport(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {"codebook": pl_module.net.quantize.embedding.weight.detach().clone(),
             "conv_out": pl_module.net.generator.conv_out.weight.detach().clone(),
             "ema_codebook": pl_module.ema.module.quantize.embedding.weight.detach().clone()},
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_codebook_options(tmp_path, tiny_vqgan, synthetic_faces, make_loader, make_trainer):
    module = tiny_vqgan(disc_start_step=2, kmeans_init=True, kmeans_min_samples=64, dead_code_steps=2)
    trainer = make_trainer(6, devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                           callbacks=[_RankReport(str(tmp_path))])
    trainer.fit(module, make_loader(synthetic_faces(8, 32), batch_size=4))  # each rank gets other faces
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)

"""Stage III (CFTModule): hand-over, freezing, schedules, GAN start, EMA, resume, export, and the
fidelity/quality trade-off on tiny fixed batches."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from random_weights import write_random_vgg16
from torch.utils.data import DataLoader, Dataset

from codeformer_lightning import CheckpointError, load_pretrained, save_published, save_weights
from codeformer_lightning.models.cft import CFTModule
from codeformer_lightning.models.code_predictor import CodePredictorModule
from codeformer_lightning.nn import CodeFormer, PatchDiscriminator, VQAutoEncoder

AE = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,), codebook_size=64,
          emb_dim=32, norm_groups=8)
CF = dict(AE, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))
DISC = dict(ndf=16, n_layers=2)

pytestmark = pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")


def degrade(x: torch.Tensor, seed: int, factor: int, noise: float) -> torch.Tensor:
    """Deterministic blur (down/up-sampling) + Gaussian noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
    return (y + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


class Triplets(Dataset):
    """Stage III samples ``{"lq", "lq_large", "gt"}`` (+ extra keys) cycling over fixed tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], length: int) -> None:
        self.tensors, self.length = tensors, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        i = i % len(self.tensors["gt"])
        return {k: v[i] for k, v in self.tensors.items()}


@pytest.fixture
def data(synthetic_faces):
    gt, val_gt = synthetic_faces(8, 32, seed=1), synthetic_faces(8, 32, seed=2)
    return {
        "train": {"lq": degrade(gt, 1, 2, 0.05), "lq_large": degrade(gt, 2, 8, 0.2), "gt": gt},
        "val": {"lq": degrade(val_gt, 3, 2, 0.05), "gt": val_gt},
    }


def loader(tensors: dict, steps: int) -> DataLoader:
    n = len(tensors["gt"])
    return DataLoader(Triplets(tensors, n * steps), batch_size=n, shuffle=False)


@pytest.fixture
def stage1(data, tmp_path):
    """Stage I stand-in: random encoder/generator, codebook drawn from the faces' latents."""
    torch.manual_seed(123)
    ae = VQAutoEncoder(**AE).eval()
    with torch.no_grad():
        z, _ = ae.encoder(torch.cat([data["train"]["gt"], data["val"]["gt"]]))
        rows = z.permute(0, 2, 3, 1).reshape(-1, AE["emb_dim"])
        ae.quantize.embedding.weight.copy_(rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:64]])
    path = tmp_path / "vqgan.safetensors"
    save_weights(ae, path)
    return ae, path


@pytest.fixture
def stage2(stage1, tmp_path):
    """A stage II export (two steps of code prediction on top of stage I)."""
    _, ae_path = stage1
    torch.manual_seed(1)
    module = CodePredictorModule(CodeFormer(**CF), autoencoder=str(ae_path), ema_decay=0.0)
    module.net.code_head[1].weight.data.normal_()  # something stage-II-specific to recognise
    module.ema.copy_from(module.net)
    return module.export(tmp_path / "stage2.safetensors")


def make_cft(stage1, stage2, lr: float = 1e-3, disc: bool = True, **kwargs) -> CFTModule:
    _, ae_path = stage1
    torch.manual_seed(0)
    opt = partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99))
    kwargs.setdefault("perceptual_weight", 0.0)
    kwargs.setdefault("ema_decay", 0.9)
    kwargs.setdefault("discriminator_from", "random" if disc else None)
    return CFTModule(
        CodeFormer(**CF), PatchDiscriminator(**DISC) if disc else None, optimizer=opt, d_optimizer=opt,
        init_from=str(stage2), autoencoder=str(ae_path), **kwargs,
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4.0 / ((a - b) ** 2).mean(dim=(1, 2, 3)))).mean().item()


# ----------------------------------------------------------------------------- hand-over and freezing
def test_starts_from_stage2_with_fusion_trainable_and_generator_frozen(stage1, stage2):
    module = make_cft(stage1, stage2)
    net, exported = module.net, load_pretrained(stage2)
    for (k, a), b in zip(net.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(not p.requires_grad for p in net.quantize.parameters())
    assert all(not p.requires_grad for p in net.generator.parameters())
    assert all(p.requires_grad for m in (net.fusion, net.encoder, net.transformer, net.code_head) for p in m.parameters())
    opt_g, opt_d = module.configure_optimizers()
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {id(p) for p in module.discriminator.parameters()}
    # adaptive GAN weight measured at the last conv of the largest fusion block's shift branch
    assert module.adaptive_weight_layer is net.fusion["16"].shift[-1].weight


def test_trainable_parts_follow_the_config(stage1, stage2):
    module = make_cft(stage1, stage2, train_encoder=False, train_transformer=False, train_generator=True)
    net = module.net
    assert all(not p.requires_grad for m in (net.encoder, net.transformer, net.feat_proj, net.code_head) for p in m.parameters())
    assert not net.position_emb.requires_grad
    assert all(p.requires_grad for p in net.generator.parameters())
    assert module.adaptive_weight_layer is net.generator.last_layer
    with pytest.raises(ValueError, match="large-degradation steps train only the code path"):
        make_cft(stage1, stage2, train_encoder=False, train_transformer=False, small_degradation_every=[[0, 1], [10, 3]])
    with pytest.raises(ValueError, match="val_fidelities"):
        make_cft(stage1, stage2, val_fidelities=(0.0, 1.5))


def test_starts_from_published_layout_files(stage1, tmp_path):
    _, ae_path = stage1
    torch.manual_seed(7)
    published = CodeFormer(**CF)
    cf_path = save_published(published, tmp_path / "codeformer.pth")
    disc = PatchDiscriminator(**DISC)
    d_path = save_published(disc, tmp_path / "vqgan_discriminator.pth")
    module = CFTModule(
        CodeFormer(**CF), None, init_from=str(cf_path), autoencoder=str(ae_path), discriminator_from=str(d_path),
        perceptual_weight=0.0,
    )
    for (k, a), b in zip(module.net.state_dict().items(), published.state_dict().values()):
        assert torch.equal(a, b), k
    assert isinstance(module.discriminator, PatchDiscriminator)
    assert torch.equal(module.discriminator.main[0].weight, disc.main[0].weight)
    assert torch.equal(module.ema.module.fusion["16"].shift[0].weight, published.fusion["16"].shift[0].weight)


def test_wrong_files_fail_clearly(stage1, stage2):
    _, ae_path = stage1
    with pytest.raises(CheckpointError, match="init_from= expects CodeFormer weights"):
        CFTModule(CodeFormer(**CF), init_from=str(ae_path), perceptual_weight=0.0)
    with pytest.raises(CheckpointError, match="n_layers: 2 vs 1"):
        CFTModule(CodeFormer(**dict(CF, n_layers=1)), init_from=str(stage2), perceptual_weight=0.0)
    with pytest.raises(CheckpointError, match="discriminator_from= expects"):
        CFTModule(CodeFormer(**CF), init_from=str(stage2), discriminator_from=str(stage2), perceptual_weight=0.0)
    with pytest.raises(FileNotFoundError, match="perceptual"):
        CFTModule(CodeFormer(**CF), init_from=str(stage2), perceptual_weight=1.0, perceptual_weights="/nonexistent/vgg.pth")


def test_single_stage_start_from_stage1_only(stage1):
    """The published inpainting recipe: no stage II; the autoencoder seeds the net and the targets."""
    ae, ae_path = stage1
    module = CFTModule(CodeFormer(**CF), None, autoencoder=str(ae_path), perceptual_weight=0.0)
    assert torch.equal(module.net.encoder.conv_in.weight, ae.encoder.conv_in.weight)
    assert torch.equal(module.net.quantize.embedding.weight, ae.quantize.embedding.weight)
    x = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    assert torch.equal(module.targets(x), ae.encode(x).indices)


# ----------------------------------------------------------------------------- learning
def test_l1_falls_and_higher_w_gives_higher_psnr(data, stage1, stage2, make_trainer, loss_recorder, tmp_path):
    steps = 90
    module = make_cft(stage1, stage2, disc_start_step=45, small_degradation_every=[[0, 1], [60, 3]])
    fusion_before = module.net.fusion["8"].scale[0].weight.clone()
    generator_before = module.net.generator.conv_out.weight.clone()
    make_trainer(steps, callbacks=[loss_recorder]).fit(module, loader(data["train"], steps))
    l1 = loss_recorder.series("l1")
    assert np.mean(l1[-5:]) < 0.5 * l1[0]
    assert len(loss_recorder.series("d_loss")) > 0  # the GAN phase ran
    assert not torch.equal(module.net.fusion["8"].scale[0].weight, fusion_before)
    assert torch.equal(module.net.generator.conv_out.weight, generator_before)

    logger = CSVLogger(tmp_path, name="cft")
    trainer = make_trainer(0, limit_val_batches=1.0, logger=logger)
    metrics = trainer.validate(module, DataLoader(Triplets(data["val"], 8), batch_size=8), verbose=False)[0]
    print("stage III: train L1 {:.3f} -> {:.3f}; val PSNR w=0 {:.2f} | w=0.5 {:.2f} | w=1 {:.2f} (input {:.2f}); "
          "SSIM w=0 {:.3f} | w=1 {:.3f}".format(
              l1[0], l1[-1], metrics["val/psnr_w0"], metrics["val/psnr_w0.5"], metrics["val/psnr_w1"],
              psnr(data["val"]["lq"], data["val"]["gt"]), metrics["val/ssim_w0"], metrics["val/ssim_w1"]))
    assert metrics["val/psnr_w1"] > metrics["val/psnr_w0"] + 3.0
    assert metrics["val/psnr_w1"] > metrics["val/psnr_w0.5"] > metrics["val/psnr_w0"]
    assert metrics["val/ssim_w1"] > metrics["val/ssim_w0"]
    # the logged PSNR is the mean per-image PSNR of the EMA restorations
    restored = module.restore_at(data["val"]["lq"], [1.0])[0]
    assert metrics["val/psnr_w1"] == pytest.approx(psnr(restored, data["val"]["gt"]), abs=1e-3)
    # one grid: input | w=0 | w=0.5 | w=1 | target
    grids = list((tmp_path / "cft").rglob("val_samples_step*.png"))
    assert len(grids) == 1
    assert Image.open(grids[0]).size == (5 * 32, 8 * 32)


def test_schedules_drive_each_step(data, stage1, stage2, make_trainer, loss_recorder):
    w_table = [[0, 1.0], [3, 1.3], [5, 0.0]]  # w > 1 and w = 0 (with the GAN on) both train
    mix = [[0, 1], [4, 2]]  # from step 4 on: odd steps small, even steps large
    module = make_cft(stage1, stage2, fidelity_schedule=w_table, small_degradation_every=mix, disc_start_step=2)

    class DiscWatch(type(loss_recorder)):
        def __init__(self):
            super().__init__()
            self.disc = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.disc.append(pl_module.discriminator.main[0].weight.detach().clone())

    watch = DiscWatch()
    make_trainer(8, callbacks=[watch]).fit(module, loader(data["train"], 8))
    assert watch.series("w") == pytest.approx([1.0, 1.0, 1.0, 1.3, 1.3, 0.0, 0.0, 0.0])
    large = [bool(v) for v in watch.series("large_degradation")]
    assert large == [False, False, False, False, True, False, True, False]
    for step, logs in enumerate(watch.logs):
        assert ("l1" in logs) == (not large[step])  # large steps: code losses only
        assert ("d_loss" in logs) == (step >= 2 and not large[step])
        assert "ce" in logs and "feat" in logs
    assert torch.equal(watch.disc[0], watch.disc[1])  # no discriminator step before disc_start_step
    assert not torch.equal(watch.disc[1], watch.disc[2])
    assert torch.equal(watch.disc[3], watch.disc[4])  # no discriminator step on a large-degradation step
    assert module.global_step == 8  # discriminator steps do not count


def test_missing_large_degradation_input_is_named(data, stage1, stage2, make_trainer):
    module = make_cft(stage1, stage2, small_degradation_every=0)
    small_only = {k: v for k, v in data["train"].items() if k != "lq_large"}
    with pytest.raises(KeyError, match="lq_large"):
        make_trainer(1).fit(module, loader(small_only, 1))


def test_ema_update_rule(data, stage1, stage2, make_trainer):
    module = make_cft(stage1, stage2, ema_decay=0.75, disc=False)
    before = module.net.fusion["16"].shift[-1].weight.detach().clone()
    make_trainer(1).fit(module, loader(data["train"], 1))
    live = module.net.fusion["16"].shift[-1].weight
    assert not torch.equal(live, before)
    assert torch.allclose(module.ema.module.fusion["16"].shift[-1].weight, 0.75 * before + 0.25 * live, atol=1e-7)
    assert int(module.ema.num_updates) == 1


def test_resume_gives_the_same_next_loss(data, stage1, stage2, make_trainer, loss_recorder, tmp_path):
    kwargs = dict(disc_start_step=1, small_degradation_every=[[0, 1], [2, 2]], fidelity_schedule=[[0, 1.0], [3, 1.3]])
    full, resumed = loss_recorder, type(loss_recorder)()
    make_trainer(5, callbacks=[full]).fit(make_cft(stage1, stage2, **kwargs), loader(data["train"], 5))

    trainer = make_trainer(3)
    trainer.fit(make_cft(stage1, stage2, **kwargs), loader(data["train"], 5))
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    second = make_cft(stage1, stage2, **kwargs)
    make_trainer(5, callbacks=[resumed]).fit(second, loader(data["train"], 5), ckpt_path=ckpt)
    assert len(resumed.logs) == 2
    for key in ("loss", "l1", "d_loss", "ce"):
        assert resumed.series(key) == pytest.approx(full.series(key)[-len(resumed.series(key)):], rel=1e-5), key
    assert int(second.ema.num_updates) == 5


def test_export_round_trips_through_load_pretrained(data, stage1, stage2, make_trainer, tmp_path):
    module = make_cft(stage1, stage2, disc=False)
    make_trainer(2).fit(module, loader(data["train"], 2))
    loaded = load_pretrained(module.export(tmp_path / "cft.safetensors"))
    lq = data["val"]["lq"]
    with torch.no_grad():
        for w in (0.0, 0.5, 1.0):
            assert torch.equal(module.ema.module(lq, w=w), loaded(lq, w=w))
    # and it can start another stage III run (fine-tuning)
    again = make_cft(stage1, tmp_path / "cft.safetensors")
    assert torch.equal(again.net.fusion["8"].shift[0].weight, module.ema.module.fusion["8"].shift[0].weight)


def test_inpainting_variant_ignores_the_mask(synthetic_faces, make_trainer, loss_recorder, tmp_path):
    """Inpainting-style config: codebook 32, fusion without the largest resolution, constant w = 1, one
    validation w, single-stage start from the autoencoder; the batch's "mask" is not an input."""
    cfg = dict(CF, codebook_size=32, fusion_resolutions=(8,))
    torch.manual_seed(3)
    ae = VQAutoEncoder(**{k: v for k, v in cfg.items() if k in AE})
    ae_path = save_weights(ae, tmp_path / "vqgan512.safetensors")
    gt = synthetic_faces(4, 32, seed=5)
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:20, 6:26] = 1
    tensors = {"lq": gt * (1 - mask) + mask, "gt": gt, "mask": mask}

    def run(with_mask: bool):
        torch.manual_seed(0)
        module = CFTModule(CodeFormer(**cfg), PatchDiscriminator(**DISC), discriminator_from="random",
                           autoencoder=str(ae_path), perceptual_weight=0.0,
                           fidelity_schedule=1.0, small_degradation_every=1, val_fidelities=(1.0,), disc_start_step=1)
        rec = type(loss_recorder)()
        batch = tensors if with_mask else {k: v for k, v in tensors.items() if k != "mask"}
        make_trainer(2, callbacks=[rec]).fit(module, loader(batch, 2))
        return module, rec

    module, with_mask = run(True)
    _, without = run(False)
    assert with_mask.series("loss") == pytest.approx(without.series("loss"))
    assert module.adaptive_weight_layer is module.net.fusion["8"].shift[-1].weight
    metrics = make_trainer(0, limit_val_batches=1.0).validate(module, loader(tensors, 1), verbose=False)[0]
    assert set(k for k in metrics if k.startswith("val/psnr")) == {"val/psnr_w1"}


@pytest.mark.filterwarnings("ignore:LPIPS. no linear heads")
def test_perceptual_loss_and_lpips_metric_with_weights(data, stage1, stage2, make_trainer, loss_recorder, tmp_path):
    vgg = write_random_vgg16(tmp_path / "vgg16.pth", bias_std=0.0, dtype=torch.half)
    module = make_cft(stage1, stage2, disc=False, perceptual_weight=1.0, perceptual_weights=vgg, val_fidelities=(0.0, 1.0))
    make_trainer(1, callbacks=[loss_recorder]).fit(module, loader(data["train"], 1))
    logs = loss_recorder.logs[0]
    assert logs["perceptual"] > 0
    assert logs["loss"] == pytest.approx(logs["l1"] + logs["perceptual"] + 0.5 * logs["ce"] + logs["feat"], rel=1e-5)
    metrics = make_trainer(0, limit_val_batches=1.0).validate(module, loader(data["val"], 1), verbose=False)[0]
    assert {"val/lpips_w0", "val/lpips_w1"} <= set(metrics)
    assert metrics["val/lpips_w1"] > 0

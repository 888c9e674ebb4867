"""Stage II (CodePredictorModule): hand-over from stage I, freezing, learning, EMA, resume, export,
and the latent-code file."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from random_weights import write_random_vgg16
from torch.utils.data import DataLoader, Dataset

from codeformer_lightning import CheckpointError, load_pretrained, save_published, save_weights
from codeformer_lightning.data.datasets import image_to_tensor, read_face
from codeformer_lightning.data.latent_codes import read_latent_codes
from codeformer_lightning.models.code_predictor import CodePredictorModule
from codeformer_lightning.models.latent_codes import CodeTargetEncoder, write_latent_codes
from codeformer_lightning.models.latent_codes import (
    main as latent_codes_main,
)
from codeformer_lightning.nn import CodeFormer, VQAutoEncoder

AE = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,), codebook_size=64,
          emb_dim=32, norm_groups=8)
CF = dict(AE, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))
K = AE["codebook_size"]


def degrade(x: torch.Tensor, seed: int, factor: int = 4, noise: float = 0.1) -> torch.Tensor:
    """Deterministic blur (down/up-sampling) + Gaussian noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
    return (y + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


class Pairs(Dataset):
    """``{"lq", "gt"}`` (+ ``"codes"``) samples cycling over fixed tensors; ``length`` samples in all."""

    def __init__(self, lq, gt, codes=None, length: int | None = None) -> None:
        self.lq, self.gt, self.codes = lq, gt, codes
        self.length = length or len(gt)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        i = i % len(self.gt)
        item = {"lq": self.lq[i], "gt": self.gt[i]}
        if self.codes is not None:
            item["codes"] = self.codes[i]
        return item


def stage1_autoencoder(faces: torch.Tensor) -> VQAutoEncoder:
    """A tiny stage I stand-in: random encoder/generator, codebook drawn from the faces' latents.

    (A random codebook would map nearly every position to the same few codes.)
    """
    torch.manual_seed(123)
    ae = VQAutoEncoder(**AE).eval()
    with torch.no_grad():
        z, _ = ae.encoder(faces)
        rows = z.permute(0, 2, 3, 1).reshape(-1, AE["emb_dim"])
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:K]
        ae.quantize.embedding.weight.copy_(rows[pick])
    return ae


@pytest.fixture
def data(synthetic_faces):
    gt = synthetic_faces(8, 32, seed=1)
    val_gt = synthetic_faces(8, 32, seed=2)
    return {"gt": gt, "lq": degrade(gt, 1), "val_gt": val_gt, "val_lq": degrade(val_gt, 2)}


@pytest.fixture
def stage1(data, tmp_path):
    ae = stage1_autoencoder(torch.cat([data["gt"], data["val_gt"]]))
    path = tmp_path / "vqgan.safetensors"
    save_weights(ae, path)
    return ae, path


def make_module(stage1_path, lr: float = 1e-3, **kwargs) -> CodePredictorModule:
    torch.manual_seed(0)
    kwargs.setdefault("ema_decay", 0.9)
    return CodePredictorModule(
        CodeFormer(**CF), optimizer=partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99)), autoencoder=str(stage1_path),
        **kwargs,
    )


def loader(data, steps: int, codes=None, split: str = "") -> DataLoader:
    lq, gt = data[f"{split}lq"], data[f"{split}gt"]
    return DataLoader(Pairs(lq, gt, codes, length=len(gt) * steps), batch_size=len(gt), shuffle=False)


# ----------------------------------------------------------------------------- hand-over and freezing
def test_starts_from_stage1_with_frozen_codebook_and_generator(stage1):
    ae, path = stage1
    module = make_module(path)
    net = module.net
    for part in ("encoder", "quantize", "generator"):
        for (name, a), b in zip(getattr(net, part).state_dict().items(), getattr(ae, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name} not copied from stage I"
    assert all(not p.requires_grad for p in net.quantize.parameters())
    assert all(not p.requires_grad for p in net.generator.parameters())
    assert all(not p.requires_grad for p in net.fusion.parameters())
    assert all(p.requires_grad for m in (net.encoder, net.transformer, net.code_head, net.feat_proj) for p in m.parameters())
    # the optimiser receives exactly the trainable parameters
    opt = module.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}
    # the target encoder is a frozen copy, not the trained LQ encoder
    assert all(not p.requires_grad for p in module.targets.parameters())
    assert module.targets.encoder is not net.encoder


def test_loads_published_vqgan_layout(stage1, tmp_path):
    ae, _ = stage1
    published = save_published(ae, tmp_path / "vqgan_code1024.pth")
    module = make_module(published)
    assert torch.equal(module.net.quantize.embedding.weight, ae.quantize.embedding.weight)
    assert torch.equal(module.net.encoder.conv_in.weight, ae.encoder.conv_in.weight)


def test_mismatched_or_wrong_files_fail_clearly(stage1, tmp_path):
    other = VQAutoEncoder(**dict(AE, codebook_size=32))
    save_weights(other, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="codebook_size: 32 vs 64"):
        make_module(tmp_path / "small.safetensors")
    save_weights(CodeFormer(**CF), tmp_path / "cf.safetensors")
    with pytest.raises(CheckpointError, match="init_from"):
        make_module(tmp_path / "cf.safetensors")


def test_needs_target_codes():
    module = CodePredictorModule(CodeFormer(**CF))
    batch = {"lq": torch.zeros(1, 3, 32, 32), "gt": torch.zeros(1, 3, 32, 32)}
    with pytest.raises(ValueError, match="no target codes"):
        module.target_codes(batch)
    codes = torch.randint(0, K, (1, 16))
    assert torch.equal(module.target_codes(dict(batch, codes=codes)), codes)


# ----------------------------------------------------------------------------- learning
def test_code_accuracy_rises_and_losses_fall(data, stage1, make_trainer, loss_recorder):
    _, path = stage1
    module = make_module(path)
    frozen = {k: v.clone() for k, v in module.net.state_dict().items() if k.startswith(("quantize.", "generator."))}
    enc_before = module.net.encoder.conv_in.weight.clone()
    steps = 80
    make_trainer(steps, callbacks=[loss_recorder]).fit(module, loader(data, steps))
    acc, ce, feat = loss_recorder.series("code_acc"), loss_recorder.series("ce"), loss_recorder.series("feat")
    assert len(acc) == steps
    codes = module.targets(data["gt"])
    majority = codes.flatten().bincount().max().item() / codes.numel()
    print(f"stage II: train code acc {acc[0]:.3f} -> {acc[-1]:.3f} (chance {1 / K:.3f}, majority {majority:.3f}); "
          f"CE {ce[0]:.3f} -> {ce[-1]:.3f}; feat {feat[0]:.4f} -> {feat[-1]:.4f}")
    assert np.mean(acc[-5:]) > max(10 / K, 5 * majority)
    assert np.mean(ce[-5:]) < 0.3 * ce[0]
    assert np.mean(feat[-5:]) < 0.5 * feat[0]
    # frozen parts did not move; the LQ encoder did
    for k, v in frozen.items():
        assert torch.equal(module.net.state_dict()[k], v), k
    assert not torch.equal(module.net.encoder.conv_in.weight, enc_before)

    # validation on the EMA network: logged metrics agree with a direct computation
    trainer = make_trainer(0, limit_val_batches=1.0)
    metrics = trainer.validate(module, loader(data, 1), verbose=False)[0]
    logits, _ = module.ema.module.predict_codes(data["lq"])
    expected_acc = (logits.argmax(-1) == codes).float().mean().item()
    assert metrics["val/code_acc"] == pytest.approx(expected_acc, abs=1e-6)
    assert metrics["val/ce"] == pytest.approx(F.cross_entropy(logits.transpose(1, 2), codes).item(), rel=1e-4)
    assert metrics["val/code_acc"] > 10 / K
    assert 5 < metrics["val/psnr"] < 60
    assert "val/lpips" not in metrics  # no perceptual weights configured


def test_ema_follows_the_trained_network(data, stage1, make_trainer):
    _, path = stage1
    module = make_module(path, ema_decay=0.5)
    start = module.net.code_head[1].weight.detach().clone()
    make_trainer(3).fit(module, loader(data, 3))
    assert int(module.ema.num_updates) == 3
    live = module.net.code_head[1].weight
    ema = module.ema.module.code_head[1].weight
    assert not torch.equal(ema, start) and not torch.equal(ema, live)
    # the average lies strictly between where it started and the live weights
    assert (ema - live).norm() < (start - live).norm()


def test_multistep_schedule_is_stepped_per_step(data, stage1, make_trainer):
    _, path = stage1
    module = make_module(path, lr=1e-3)
    module.scheduler_factory = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2, 4], gamma=0.5)
    trainer = make_trainer(5)
    trainer.fit(module, loader(data, 5))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


def test_resume_gives_the_same_next_loss(data, stage1, make_trainer, loss_recorder, tmp_path):
    _, path = stage1
    full, resumed = loss_recorder, type(loss_recorder)()
    make_trainer(4, callbacks=[full]).fit(make_module(path), loader(data, 4))

    first = make_module(path)
    trainer = make_trainer(2)
    trainer.fit(first, loader(data, 4))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    second = make_module(path)
    make_trainer(4, callbacks=[resumed]).fit(second, loader(data, 4), ckpt_path=ckpt)
    assert len(resumed.logs) == 2
    assert resumed.series("loss") == pytest.approx(full.series("loss")[2:], rel=1e-5)
    assert int(second.ema.num_updates) == 4


def test_export_round_trips_through_load_pretrained(data, stage1, make_trainer, tmp_path):
    _, path = stage1
    module = make_module(path)
    make_trainer(2).fit(module, loader(data, 2))
    out = module.export(tmp_path / "stage2.safetensors")
    loaded = load_pretrained(out)
    assert type(loaded) is CodeFormer
    with torch.no_grad():
        a = module.ema.module.restore(data["lq"], w=0.0).image
        b = loaded.restore(data["lq"], w=0.0).image
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- latent-code file
@pytest.fixture
def image_folder(data, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, img in enumerate(data["gt"][:4]):
        arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"face_{i:02d}.png")
    return folder


def test_latent_code_file_holds_original_and_flipped_codes(stage1, image_folder, tmp_path):
    ae, path = stage1
    out = write_latent_codes(path, image_folder, tmp_path / "codes.pth", batch_size=3)
    codes = read_latent_codes(out)
    assert sorted(codes["orig"]) == [f"face_{i:02d}" for i in range(4)] == sorted(codes["hflip"])
    encoder = CodeTargetEncoder(ae)
    img = image_to_tensor(read_face(image_folder / "face_02.png", 32))[None]
    assert torch.equal(codes["orig"]["face_02"], encoder(img)[0])
    assert torch.equal(codes["hflip"]["face_02"], encoder(img.flip(-1))[0])
    assert codes["orig"]["face_02"].dtype == torch.long and codes["orig"]["face_02"].shape == (16,)


def test_latent_codes_see_the_training_pixels_and_skip_bad_files(stage1, image_folder, tmp_path):
    """Codes are computed from the pixels the data pipeline delivers (RGBA on white, same resize), and a
    file that does not decode is named and skipped, not fatal."""
    from codeformer_lightning.data.datasets import BadImageWarning, FaceDataset, ImageFolderSource

    ae, path = stage1
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[8:32, 8:32] = (200, 50, 50, 255)  # a red square on a transparent background of another size
    Image.fromarray(rgba, "RGBA").save(image_folder / "face_rgba.png")
    (image_folder / "broken.png").write_bytes(b"not a png")
    with pytest.warns(BadImageWarning, match="broken.png"):
        codes = read_latent_codes(write_latent_codes(path, image_folder, tmp_path / "codes.pth"))
    assert "broken" not in codes["orig"] and "face_rgba" in codes["orig"]
    with pytest.warns(BadImageWarning):
        data = FaceDataset(ImageFolderSource(image_folder), 32, degradation="none", use_hflip=False)
        sample = next(data[i] for i in range(len(data)) if data[i]["name"] == "face_rgba")
    assert torch.equal(codes["orig"]["face_rgba"], CodeTargetEncoder(ae)(sample["gt"][None])[0])


def test_latent_code_command(stage1, image_folder, tmp_path, capsys):
    _, path = stage1
    out = tmp_path / "sub" / "codes.pth"
    assert latent_codes_main(["--autoencoder", str(path), "--images", str(image_folder), "--out", str(out)]) == 0
    assert "4 images" in capsys.readouterr().out
    assert len(read_latent_codes(out)["hflip"]) == 4
    with pytest.raises(SystemExit) as exc:
        latent_codes_main(["--autoencoder", str(path), "--images", str(tmp_path / "nope"), "--out", str(out)])
    assert exc.value.code == 2
    assert "no such image folder" in capsys.readouterr().err


def test_codes_from_the_batch_give_the_same_loss_as_on_the_fly(data, stage1, make_trainer, loss_recorder):
    _, path = stage1
    on_the_fly, from_file = loss_recorder, type(loss_recorder)()
    make_trainer(2, callbacks=[on_the_fly]).fit(make_module(path), loader(data, 2))
    codes = make_module(path).targets(data["gt"])
    torch.manual_seed(0)
    precomputed = CodePredictorModule(
        CodeFormer(**CF), optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.99)), ema_decay=0.9
    )
    precomputed.net.load_state_dict(make_module(path).net.state_dict())
    make_trainer(2, callbacks=[from_file]).fit(precomputed, loader(data, 2, codes=codes))
    assert from_file.series("loss") == pytest.approx(on_the_fly.series("loss"), rel=1e-5)


@pytest.mark.filterwarnings("ignore:LPIPS. no linear heads")
def test_lpips_is_logged_when_perceptual_weights_are_given(data, stage1, make_trainer, tmp_path):
    _, path = stage1
    module = make_module(path, perceptual_weights=write_random_vgg16(tmp_path / "vgg16.pth", bias_std=0.0, dtype=torch.half))
    metrics = make_trainer(0, limit_val_batches=1.0).validate(module, loader(data, 1, split="val_"), verbose=False)[0]
    restored = module.ema.module.restore(data["val_lq"], w=0.0, adain=False).image.clamp(-1, 1)  # val_adain=False
    assert metrics["val/lpips"] == pytest.approx(module.lpips(restored, data["val_gt"]).mean().item(), rel=1e-4)
    assert metrics["val/lpips"] > 0


@pytest.mark.parametrize("variant", ["colorization", "inpainting"])
def test_the_trained_task_is_recorded_in_the_export_and_the_checkpoint(data, stage1, make_trainer, tmp_path, variant):
    """A model trained for colorization (or inpainting) says so in its files: load_pretrained gives it
    that variant and the restorer that task's published inference (before: read as restoration)."""
    from codeformer_lightning.inference.tasks import task_of_model

    _, path = stage1
    module = make_module(path, variant=variant)
    trainer = make_trainer(1)
    trainer.fit(module, loader(data, 1))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    for weights in (module.export(tmp_path / "w.safetensors"), tmp_path / "last.ckpt"):
        loaded = load_pretrained(weights)
        assert loaded.variant == variant and task_of_model(loaded).name == variant, weights
    with pytest.raises(ValueError, match="variant must be one of"):
        make_module(path, variant="colourisation")

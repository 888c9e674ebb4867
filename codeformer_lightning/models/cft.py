"""Stage III: train the Controllable Feature Transformation (fidelity weight w > 0)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..checkpoints import CheckpointError, check_variant, load_pretrained, load_state_strict, save_weights
from ..losses import LPIPS, SettingNames, VQGANLoss
from ..nn import CodeFormer, PatchDiscriminator
from ..training import EMA, log_image_grid
from ..training.nonfinite import NonFiniteGuard, RunningStats, skip_update
from .code_predictor import (
    OptimizerFactory,
    SchedulerFactory,
    code_losses,
    copy_autoencoder,
    load_autoencoder,
    load_codeformer,
    target_codes,
)
from .latent_codes import CodeTargetEncoder
from .schedules import DegradationMix, StepTable
from .stage import StageModule
from .vqgan import _no_closure, _plain_param_groups


def _published_stage3_adam(params: Iterable[nn.Parameter]) -> Optimizer:
    return torch.optim.Adam(params, lr=5e-5, betas=(0.9, 0.99))


def _w_key(w: float) -> str:
    """Metric name suffix: 0 -> ``w0``, 0.5 -> ``w0.5``, 1 -> ``w1``."""
    return f"w{w:g}"


#: what ``discriminator_from`` takes for a discriminator that starts from random weights
RANDOM_DISCRIMINATOR = "random"


def _schedules(
    fidelity_schedule, small_degradation_every, train_encoder: bool, train_transformer: bool
) -> tuple[StepTable, DegradationMix]:
    """The w schedule and the degradation mix, checked (w >= 0; large steps need a trained code path)."""
    fidelity, mix = StepTable.of(fidelity_schedule), DegradationMix(small_degradation_every)
    if any(float(w) < 0 for w in fidelity.values):
        raise ValueError(
            f"training fidelity weights must be >= 0, got fidelity_schedule={fidelity.as_list()}"
        )
    if not (train_encoder or train_transformer) and not mix.never_large():
        raise ValueError(
            "large-degradation steps train only the code path, but train_encoder and train_transformer are both "
            "off: set small_degradation_every=1 or train one of them"
        )
    return fidelity, mix


def _validation_fidelities(val_fidelities: Sequence[float]) -> list[float]:
    values = [float(w) for w in val_fidelities]
    if any(not 0.0 <= w <= 1.0 for w in values):
        raise ValueError(f"validation fidelity weights must lie in [0, 1], got val_fidelities={values}")
    return values


def _build_discriminator(
    discriminator: PatchDiscriminator | None, source: str | None, gan_weight: float
) -> PatchDiscriminator | None:
    """The discriminator to train: loaded from ``source`` (a weight file), ``discriminator`` as it is
    (``source == "random"``), or None (no GAN term). A GAN term without a stated start is an error:
    the published stage III starts from the stage I discriminator."""
    if source == RANDOM_DISCRIMINATOR:
        if discriminator is None:
            raise ValueError("discriminator_from=random needs a discriminator to start (model.discriminator)")
        return discriminator
    if not source:
        if discriminator is not None and gan_weight > 0:
            raise ValueError(
                "model.discriminator_from is not set: the published stage III starts its discriminator from stage "
                "I's, which stage I exports next to its weights (<run>/weights/vqgan_discriminator.safetensors; "
                "codeformer-pipeline passes it on). Set model.discriminator_from=/path/to/vqgan_discriminator"
                ".safetensors (or the published vqgan_discriminator.pth), or model.discriminator_from=random to "
                "start from random weights (as the published inpainting recipe does)"
            )
        return discriminator
    loaded = load_pretrained(source)
    if type(loaded) is not PatchDiscriminator:
        raise CheckpointError(
            f"{source}: holds a {type(loaded).__name__}, but discriminator_from= expects PatchGAN discriminator "
            "weights (e.g. vqgan_discriminator.pth or a stage I discriminator export)"
        )
    if discriminator is None:
        return loaded.train()
    load_state_strict(discriminator, loaded.state_dict(), str(source))
    return discriminator


def _build_lpips(
    weight: float, weights: str | None, heads: str | None, uniform_heads: bool, imagenet_prenorm: bool
) -> LPIPS | None:
    """The LPIPS of the loss (``weight > 0``) and of the validation metric (whenever VGG16 weights
    are given): one instance, the metric calls it with the standard input handling."""
    if weight <= 0 and not weights:
        return None
    names = SettingNames(
        weights="model.perceptual_weights",
        heads="model.perceptual_linear_weights",
        uniform_heads="model.perceptual_uniform_heads",
        off="model.perceptual_weight=0" if weight > 0 else "model.perceptual_weights=null",
    )
    return LPIPS(weights, heads, imagenet_prenorm, uniform_heads=uniform_heads, names=names)


class CFTModule(StageModule):
    """Stage III: trains the fusion blocks (and, by default, encoder and Transformer) with w > 0.

    Each step is a *small*- or *large*-degradation step (``small_degradation_every``):

    * small: ``net.restore(batch["lq"], w)`` with w from ``fidelity_schedule``; loss = code losses
      + ``l1_weight * L1 + perceptual_weight * LPIPS`` on the output + (from ``disc_start_step``)
      ``gan_weight * adaptive * hinge_g``, the adaptive weight measured at the last conv of the
      largest fusion block's ``shift`` (or the generator's last layer when ``train_generator``);
      then a discriminator step on the same output.
    * large: only the code path on ``batch["lq_large"]`` (code losses, no image losses, no
      discriminator step).

    Code losses: ``ce_weight * CE + feat_weight * MSE(lq_feat, codebook[target])``, targets from
    ``batch["codes"]`` or the frozen stage I encoder (``autoencoder``). The encoder features enter
    the fusion detached (``CodeFormer.restore``), so image losses train the fusion blocks only;
    the encoder learns from the code losses. Codebook and generator are frozen by default.

    ``trainer.global_step`` counts generator steps (the published iteration); the discriminator
    step does not count. Validation and :meth:`export` use the EMA network. Under DDP use
    ``find_unused_parameters=True``: large-degradation steps leave the fusion blocks without
    gradients, and each of the two backward passes the other network's parameters.

    Args:
        net: the CodeFormer (architecture of the stage II weights).
        discriminator: PatchGAN; None (and no ``discriminator_from`` file) trains without GAN loss.
        optimizer, d_optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true``); default Adam
            lr 5e-5, betas (0.9, 0.99) as published.
        scheduler: ``optimizer -> LRScheduler`` for both optimisers, stepped every step (published:
            :class:`~codeformer_lightning.models.schedules.CosineRestartLR`, periods [150000],
            eta_min 2e-5); None: constant.
        init_from: CodeFormer weights to start from: the stage II export or ``codeformer.pth``.
        autoencoder: stage I weights (export or ``vqgan_code1024.pth``): the frozen target encoder;
            without ``init_from`` also copied into ``net`` (single-stage training, as the published
            inpainting model). Needed unless every batch has ``"codes"``.
        discriminator_from: where the discriminator starts: a weight file (stage I's export
            ``<run>/weights/vqgan_discriminator.safetensors``, ``params_d`` of the published
            ``vqgan_discriminator.pth``; it builds the discriminator when ``discriminator`` is None)
            or ``"random"`` (``discriminator`` as given). Required whenever a discriminator trains:
            the published stage III starts from a trained one, a random start must be chosen.
        train_encoder, train_transformer, train_generator: which parts train besides the fusion
            blocks (published: True, True, False). The codebook never trains.
        fidelity_schedule: w per step range, ``[[start_step, w], ...]`` or a number (w may exceed 1
            in training; published ``[[0, 1], [40000, 1.3], [80000, 0], [120000, 1.3]]``).
        small_degradation_every: the degradation mix, see
            :class:`~codeformer_lightning.models.schedules.DegradationMix` (published
            ``[[0, 1], [80000, 0], [120000, 15]]``; 1 = small degradations only).
        l1_weight, perceptual_weight, gan_weight: published 1.0, 1.0, 0.1.
        perceptual_weights, perceptual_linear_weights, perceptual_imagenet_prenorm,
        perceptual_uniform_heads: LPIPS files (heads: None = the published v0.1 heads shipped with
            the package) and input handling (see :class:`~codeformer_lightning.losses.LPIPS`); the
            VGG16 file is needed when ``perceptual_weight > 0``. One LPIPS serves the loss and the
            validation LPIPS per w (standard input handling), logged whenever an LPIPS is built.
        disc_start_step: first step with GAN loss and discriminator updates (published 5001).
        ce_weight, feat_weight: published 0.5, 1.0.
        ema_decay: published 0.997.
        val_fidelities: the w values validation restores with (metrics ``val/psnr_w0.5`` ...).
        val_adain: AdaIN in validation restorations (published inference: on for restoration and
            colorization, off for inpainting).
        grad_clip: max gradient norm for both optimisers (None: off).
        max_nonfinite_steps: stop after this many consecutive steps with a NaN/inf loss or gradient
            (such steps are skipped, see :mod:`~codeformer_lightning.training.nonfinite`); None: never.
        variant: the task the weights are for (``restoration``, ``colorization``, ``inpainting``),
            written into the export and the checkpoints: ``load_pretrained`` and the restorer then apply
            that task's published inference settings (None: not recorded, read as restoration).

    Checkpoints record ``net`` and ``discriminator`` (class and constructor config) and the frozen target encoder:
    ``CFTModule.load_from_checkpoint(ckpt)`` rebuilds them without reading the weight files again
    (see :mod:`.stage`).
    """

    network_args = ("net", "discriminator")

    @classmethod
    def file_free_kwargs(cls, networks: dict) -> dict:
        return {"init_from": None, "autoencoder": None, "discriminator_from": RANDOM_DISCRIMINATOR if networks.get("discriminator") else None}

    def __init__(
        self,
        net: CodeFormer,
        discriminator: PatchDiscriminator | None = None,
        optimizer: OptimizerFactory | None = None,
        d_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        init_from: str | None = None,
        autoencoder: str | None = None,
        discriminator_from: str | None = None,
        train_encoder: bool = True,
        train_transformer: bool = True,
        train_generator: bool = False,
        fidelity_schedule: StepTable | Sequence[Sequence[float]] | float = 1.0,
        small_degradation_every: StepTable | Sequence[Sequence[int]] | int = 1,
        l1_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_weights: str | None = None,
        perceptual_linear_weights: str | None = None,
        perceptual_imagenet_prenorm: bool = True,
        perceptual_uniform_heads: bool = False,
        gan_weight: float = 0.1,
        disc_start_step: int = 5001,
        ce_weight: float = 0.5,
        feat_weight: float = 1.0,
        ema_decay: float = 0.997,
        val_fidelities: Sequence[float] = (0.0, 0.5, 1.0),
        val_adain: bool = False,
        grad_clip: float | None = None,
        max_nonfinite_steps: int | None = 20,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        self.fidelity, self.mix = _schedules(
            fidelity_schedule, small_degradation_every, train_encoder, train_transformer
        )
        # plain containers in the saved hyperparameters (checkpoints load with weights_only=True)
        fidelity_schedule = self.fidelity.as_list()
        small_degradation_every = self.mix.small_every.as_list()
        val_fidelities = _validation_fidelities(val_fidelities)
        self.save_hyperparameters(
            logger=False, ignore=["net", "discriminator", "optimizer", "d_optimizer", "scheduler"]
        )
        self.automatic_optimization = False

        self.net, self.targets = net, self._load_weights(net, init_from, autoencoder)
        self._set_trainable(train_encoder, train_transformer, train_generator)
        self.discriminator = _build_discriminator(discriminator, discriminator_from, gan_weight)
        # one frozen VGG16 for the loss (published input handling) and the standard LPIPS metric
        self.lpips = _build_lpips(
            perceptual_weight, perceptual_weights, perceptual_linear_weights, perceptual_uniform_heads,
            perceptual_imagenet_prenorm,
        )  # fmt: skip
        self.image_loss = VQGANLoss(
            pixel_weight=l1_weight,
            perceptual_weight=perceptual_weight,
            codebook_weight=0.0,
            gan_weight=gan_weight,
            perceptual=self.lpips,
        )
        self.optimizer_factory = optimizer or _published_stage3_adam
        self.d_optimizer_factory = d_optimizer or _published_stage3_adam
        self.scheduler_factory = scheduler
        self.ema = EMA(net, ema_decay)

        # validation metrics per w
        keys = [_w_key(w).replace(".", "_") for w in val_fidelities]  # ModuleDict keys cannot hold dots
        self.val_psnr = nn.ModuleDict({k: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for k in keys})
        self.val_ssim = nn.ModuleDict({k: StructuralSimilarityIndexMeasure(data_range=1.0) for k in keys})
        self.val_lpips = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.val_l1 = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.last_logs: dict[str, torch.Tensor] = {}
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)

    # ------------------------------------------------------------------------- setup
    def _set_trainable(self, encoder: bool, transformer: bool, generator: bool) -> None:
        net = self.net
        net.requires_grad_(False)
        net.fusion.requires_grad_(True)
        net.encoder.requires_grad_(encoder)
        for part in (net.feat_proj, net.transformer, net.code_head):
            part.requires_grad_(transformer)
        net.position_emb.requires_grad_(transformer)
        net.generator.requires_grad_(generator)
        net.quantize.requires_grad_(False)

    @staticmethod
    def _load_weights(
        net: CodeFormer, init_from: str | None, autoencoder: str | None
    ) -> CodeTargetEncoder | None:
        """Load ``init_from`` (stage II) into ``net``, or without it the stage I ``autoencoder`` (a
        single-stage start); return the frozen stage I target encoder (None without ``autoencoder``)."""
        targets = None
        if autoencoder:
            stage1 = load_autoencoder(autoencoder)
            if not init_from:
                copy_autoencoder(net, stage1, str(autoencoder))
            targets = CodeTargetEncoder(stage1)
        if init_from:
            load_codeformer(net, init_from)
        return targets

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opts = [_plain_param_groups(self.optimizer_factory(params))]
        if self.discriminator is not None:
            opts.append(_plain_param_groups(self.d_optimizer_factory(self.discriminator.parameters())))
        if self.scheduler_factory is None:
            return opts
        return opts, [self.scheduler_factory(opt) for opt in opts]

    @property
    def adaptive_weight_layer(self) -> torch.Tensor:
        """Where the adaptive GAN weight compares gradient norms (the last trained conv before the image)."""
        if self.hparams.train_generator:
            return self.net.generator.last_layer
        largest = str(max(self.net.fusion_resolutions))
        return self.net.fusion[largest].shift[-1].weight

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.hparams.gan_weight > 0 and step >= self.hparams.disc_start_step

    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def _schedulers(self) -> list:
        sch = self.lr_schedulers()
        return [] if sch is None else sch if isinstance(sch, list) else [sch]

    # ------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        """Restored ``(B,3,S,S)`` in [-1,1] of ``x`` ``(B,3,S,S)`` in [-1,1] by the EMA network."""
        return self.ema.module(x, w=w, adain=adain)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        opt_g, opt_d = self._optimizers()
        w = float(self.fidelity(step))
        large = self.mix.is_large(step)
        gt = batch["gt"]
        gan_on = not large and self.gan_active(step)
        disc_stats = RunningStats(self.discriminator if gan_on else None)

        with opt_g.toggle_model():
            total, logs, output = self._generator_loss(batch, step, w, large, gan_on)
            opt_g.zero_grad(set_to_none=True)
            if total.requires_grad:
                self.manual_backward(total)
        # a NaN/inf loss or gradient: nothing of this step is learned (see training.nonfinite)
        learn = self.nonfinite.check(self, dict(logs, loss=total.detach()), self.net.parameters())
        if not learn:
            skip_update(self, self.net.parameters())
        # always step: trainer.global_step counts steps, and parameters without gradients are skipped
        opt_g.step()
        if learn:
            self.ema.update(self.net)

        if gan_on and learn:
            with opt_d.toggle_model():
                d_loss, d_logs = self.image_loss.discriminator_loss(self.discriminator, gt, output)
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
            logs.update(d_logs)
            learn = self.nonfinite.check(self, d_logs, self.discriminator.parameters(), prefix="discriminator ")
            if learn:
                # through the strategy (precision plugin), not LightningOptimizer.step, which would
                # count the discriminator step in trainer.global_step too
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure)
        if not learn:
            disc_stats.restore()  # the skipped forward passes leave no trace in BatchNorm statistics
        for sch in self._schedulers():
            sch.step()
        self.nonfinite.end_step(self, step)

        logs.update(loss=total.detach(), w=torch.tensor(w), large_degradation=torch.tensor(float(large)))
        self.last_logs = logs
        n = gt.shape[0]
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, batch_size=n)
        self.log("train/lr", opt_g.optimizer.param_groups[0]["lr"], on_step=True, batch_size=n)
        return total.detach()

    def _generator_loss(
        self, batch: Mapping[str, Any], step: int, w: float, large: bool, gan_on: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """The generator side's total loss, its logged terms and the restored image ``(B,3,S,S)``
        (None on a large-degradation step, which trains the code path only)."""
        gt = batch["gt"]
        codes = target_codes(batch, self.targets, self.net.latent_size**2)
        if large:
            if "lq_large" not in batch:
                raise KeyError(
                    f"step {step} is a large-degradation step (small_degradation_every="
                    f"{self.mix.small_every.as_list()}) but the batch has no 'lq_large': use the data module's "
                    "stage III pairing, or small_degradation_every=1"
                )
            logits, lq_feat = self.net.predict_codes(batch["lq_large"])
            output = None
        else:
            # a tensor w: values above 1 (published 1.3) are allowed, and w = 0 still runs the
            # fusion, so the adaptive GAN weight always finds its layer in the graph
            w_arg = torch.tensor(w, device=gt.device)
            out = self.net.restore(batch["lq"], w=w_arg, adain=False, detach_codebook=True)
            logits, lq_feat, output = out.logits, out.lq_feat, out.image
        total, logs = code_losses(self.net, logits, lq_feat, codes, self.hparams.ce_weight, self.hparams.feat_weight)
        if output is not None:
            image_total, image_logs = self.image_loss.generator_loss(
                gt, output, output.new_zeros(()), self.discriminator if gan_on else None, self.adaptive_weight_layer
            )
            image_logs.pop("codebook", None)
            image_logs.pop("total", None)
            total = total + image_total
            logs.update(image_logs)
        return total, logs, output

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------------- validation / export
    @torch.no_grad()
    def restore_at(self, lq: torch.Tensor, fidelities: Sequence[float] | None = None) -> list[torch.Tensor]:
        """EMA restorations ``(B,3,S,S)`` in [-1,1] of ``lq``, one per w (default ``val_fidelities``)."""
        fidelities = self.hparams.val_fidelities if fidelities is None else fidelities
        net = self.ema.module
        return [net.restore(lq, w=float(w), adain=self.hparams.val_adain).image.float().clamp(-1, 1) for w in fidelities]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        lq, gt = batch["lq"], batch["gt"].float()
        n = lq.shape[0]
        restored = self.restore_at(lq)
        for w, image in zip(self.hparams.val_fidelities, restored):
            name = _w_key(w)
            key = name.replace(".", "_")
            self.val_psnr[key]((image + 1) / 2, (gt + 1) / 2)
            self.val_ssim[key]((image + 1) / 2, (gt + 1) / 2)
            self.val_l1[key](F.l1_loss(image, gt))
            self.log(f"val/psnr_{name}", self.val_psnr[key], on_epoch=True, batch_size=n)
            self.log(f"val/ssim_{name}", self.val_ssim[key], on_epoch=True, batch_size=n)
            self.log(f"val/l1_{name}", self.val_l1[key], on_epoch=True, batch_size=n)
            if self.lpips is not None:
                self.val_lpips[key](self.lpips(image, gt, imagenet_prenorm=False))
                self.log(f"val/lpips_{name}", self.val_lpips[key], on_epoch=True, batch_size=n)
        if batch_idx == 0 and self.trainer.is_global_zero and self.loggers:
            caption = " | ".join(["input", *(f"w={w:g}" for w in self.hparams.val_fidelities), "target"])
            log_image_grid(self.loggers, "val/samples", [lq, *restored, gt], self.global_step, caption)

    def export(self, path: str | Path) -> Path:
        """Write the EMA CodeFormer as ``.safetensors`` (readable by :func:`load_pretrained`)."""
        return save_weights(self.ema.module, path, variant=self.hparams.get("variant"))

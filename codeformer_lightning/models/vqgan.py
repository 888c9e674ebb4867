"""Stage I: train the VQGAN autoencoder, i.e. the discrete face codebook and its decoder."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..checkpoints import load_pretrained, load_state_strict, save_weights
from ..losses import VQGANLoss
from ..nn import PatchDiscriminator, VQAutoEncoder
from ..nn.quantizer import CodebookTrainer, code_statistics
from ..training import EMA, log_code_histogram, log_image_grid
from ..training.nonfinite import NonFiniteGuard, RunningStats, skip_update
from .stage import StageModule

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], torch.optim.lr_scheduler.LRScheduler]


def _published_adam(params: Iterable[nn.Parameter]) -> Optimizer:
    return torch.optim.Adam(params, lr=7e-5, betas=(0.9, 0.99))


def _plain_param_groups(opt: Optimizer) -> Optimizer:
    """Turn config containers (Hydra passes ``betas`` as a ListConfig) into tuples.

    Optimiser hyperparameters are saved in checkpoints, and ``torch.load(weights_only=True)``
    refuses anything but plain Python types.
    """
    for group in opt.param_groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, Sequence) and not isinstance(value, (str, tuple, list)):
                group[key] = tuple(value)
    return opt


def _no_closure() -> None:
    return None


class VQGANModule(StageModule):
    """Trains a :class:`VQAutoEncoder` (+ PatchGAN discriminator) on clean faces, manual optimisation.

    Each batch (``{"gt": (B,3,S,S) in [-1,1], ...}`` or a bare tensor): encode, quantize, decode,
    a generator step on :class:`VQGANLoss`, then (from ``disc_start_step`` on) a discriminator step
    on the same reconstructions. ``trainer.global_step`` counts generator steps only (the
    published "iteration"), so ``Trainer(max_steps=...)``, ``disc_start_step``, checkpoint and
    schedule intervals all count the same thing. An EMA copy of the autoencoder (``self.ema.module``)
    is what validation, :meth:`forward` and :meth:`export` use.

    Args:
        net: the autoencoder to train.
        discriminator: None trains without a GAN term.
        loss: :class:`VQGANLoss` (default: the published weights, which need VGG16 weights).
        optimizer, d_optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true``); default Adam
            lr 7e-5, betas (0.9, 0.99) as published.
        scheduler: ``optimizer -> LRScheduler`` applied to both optimisers, stepped once per
            generator step (e.g. ``CosineAnnealingWarmRestarts``); None keeps the lr constant.
        ema_decay: of the autoencoder weights (published 0.995).
        disc_start_step: generator steps before the GAN term and discriminator updates start
            (published 30001).
        grad_clip: max gradient norm for both optimisers (None: off). Set it here, not on the
            Trainer (Lightning refuses Trainer clipping with manual optimisation).
        accumulate_grad_batches: batches per optimiser step (not the Trainer's option, which manual
            optimisation does not support).
        sample_every_n_steps: generator steps between logged (input | reconstruction) grids.
        kmeans_init, kmeans_iters, kmeans_min_samples, dead_code_steps, codebook_ema_decay,
        code_buffer_size, codebook_seed: codebook upkeep, see
            :class:`~codeformer_lightning.nn.quantizer.CodebookTrainer` (all off = published).
            ``codebook_ema_decay`` (e.g. 0.99) replaces the codebook's gradient updates by EMA ones.
        pretrained: a weight file (e.g. ``vqgan_code1024.pth``) loaded into ``net`` before training.
        max_nonfinite_steps: stop after this many consecutive steps with a NaN/inf loss or gradient
            (such steps are skipped, see :mod:`~codeformer_lightning.training.nonfinite`); None: never.

    Under DDP with a discriminator use ``strategy="ddp_find_unused_parameters_true"``: each of the
    two backward passes leaves the other network's parameters without gradients. Without a
    discriminator plain DDP works.

    Checkpoints record ``net``, ``discriminator`` and ``loss`` (class and constructor config):
    ``VQGANModule.load_from_checkpoint(ckpt)`` rebuilds them (see :mod:`.stage`).
    """

    network_args = ("net", "discriminator", "loss")

    @classmethod
    def file_free_kwargs(cls, networks: dict) -> dict:
        return {"pretrained": None}

    def __init__(
        self,
        net: VQAutoEncoder,
        discriminator: PatchDiscriminator | None = None,
        loss: VQGANLoss | None = None,
        optimizer: OptimizerFactory | None = None,
        d_optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        ema_decay: float = 0.995,
        disc_start_step: int = 30001,
        grad_clip: float | None = None,
        accumulate_grad_batches: int = 1,
        sample_every_n_steps: int = 1000,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_min_samples: int | None = None,
        dead_code_steps: int = 0,
        codebook_ema_decay: float | None = None,
        code_buffer_size: int = 4096,
        codebook_seed: int = 0,
        pretrained: str | None = None,
        max_nonfinite_steps: int | None = 20,
    ) -> None:
        super().__init__()
        # networks, the loss and the factories are objects, not hyperparameters; leaving them out
        # also keeps checkpoints loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "discriminator", "loss", "optimizer", "d_optimizer", "scheduler"])
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if pretrained:
            self._load_pretrained(net, pretrained)
        self.net = net
        self.discriminator = discriminator
        self.loss = loss if loss is not None else VQGANLoss()
        self.optimizer_factory = optimizer or _published_adam
        self.d_optimizer_factory = d_optimizer or _published_adam
        self.scheduler_factory = scheduler
        self.codebook = CodebookTrainer(
            net.quantize.codebook_size, net.quantize.emb_dim, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            kmeans_min_samples=kmeans_min_samples, dead_code_steps=dead_code_steps, ema_decay=codebook_ema_decay,
            buffer_size=code_buffer_size, seed=codebook_seed,
        )
        if codebook_ema_decay is not None:
            # the EMA rule moves the codebook; the optimiser must not
            net.quantize.embedding.weight.requires_grad_(False)
        self.ema = EMA(net, ema_decay)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        # per-epoch code histogram; a plain tensor, not a buffer: DDP would overwrite buffers with rank 0's
        self._epoch_counts = torch.zeros(net.quantize.codebook_size, dtype=torch.long)
        self.last_logs: dict[str, torch.Tensor] = {}  # the latest step's logged terms (for callbacks/tests)
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self._update_ok = {"g": True, "d": True}  # per network, over the current optimiser step's batches
        self._disc_stats: RunningStats | None = None

    # ------------------------------------------------------------------------- setup
    @staticmethod
    def _load_pretrained(net: VQAutoEncoder, path: str) -> None:
        model = load_pretrained(path)
        if type(model) is not VQAutoEncoder:
            raise ValueError(
                f"{path}: holds a {type(model).__name__} ({getattr(model, 'variant', '?')}); stage I starts from a "
                "VQAutoEncoder weight file such as vqgan_code1024.pth"
            )
        load_state_strict(net, model.state_dict(), str(path))

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opts = [_plain_param_groups(self.optimizer_factory(params))]
        if self.discriminator is not None:
            opts.append(_plain_param_groups(self.d_optimizer_factory(self.discriminator.parameters())))
        if self.scheduler_factory is None:
            return opts
        return opts, [self.scheduler_factory(opt) for opt in opts]

    # ------------------------------------------------------------------------- helpers
    def _images(self, batch) -> torch.Tensor:
        x = batch["gt"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        size = self.net.img_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
            raise ValueError(f"VQGANModule expects images (B, 3, {size}, {size}) in [-1, 1], got {tuple(x.shape)}")
        return x

    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def _schedulers(self) -> list:
        sch = self.lr_schedulers()
        return [] if sch is None else sch if isinstance(sch, list) else [sch]

    def gan_active(self, step: int | None = None) -> bool:
        """Whether the GAN term and the discriminator updates are on at generator step ``step``."""
        step = self.global_step if step is None else step
        return self.discriminator is not None and step >= self.hparams.disc_start_step

    @torch.no_grad()
    def _codebook_rows_changed(self, opt_g, rows: torch.Tensor | None) -> None:
        """Propagate codebook rows set outside the optimiser (k-means, restarts) to Adam and the EMA."""
        weight = self.net.quantize.embedding.weight
        ema_weight = self.ema.module.quantize.embedding.weight
        state = opt_g.optimizer.state.get(weight, {}) if opt_g is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if rows is None:
                    state[key].zero_()
                else:
                    state[key][rows] = 0
        if rows is None:
            ema_weight.copy_(weight)
        else:
            ema_weight[rows] = weight[rows]

    # ------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(B,3,S,S)`` (unclamped) of ``x`` ``(B,3,S,S)`` in [-1,1] by the EMA autoencoder."""
        return self.ema.module(x)[0]

    def on_train_epoch_start(self) -> None:
        self._epoch_counts = torch.zeros_like(self._epoch_counts, device=self.device)

    def training_step(self, batch, batch_idx: int) -> None:
        x = self._images(batch)
        opt_g, opt_d = self._optimizers()
        k = self.hparams.accumulate_grad_batches
        step = self.global_step
        do_step = (batch_idx + 1) % k == 0 or self.trainer.is_last_batch
        gan_on = self.gan_active(step)
        if self._disc_stats is None:  # the first batch of this optimiser step
            self._disc_stats = RunningStats(self.discriminator if gan_on else None)

        recon, logs = self._generator_pass(x, opt_g, step, do_step, gan_on)
        # discriminator, on the reconstructions the generator step started from (as published)
        if gan_on and self._update_ok["d"]:
            with opt_d.toggle_model(sync_grad=do_step):
                d_loss, d_logs = self.loss.discriminator_loss(self.discriminator, x, recon)
                self.manual_backward(d_loss / k)
            logs.update(d_logs)
            disc_params = self.discriminator.parameters() if do_step else None
            self._update_ok["d"] &= self.nonfinite.check(self, d_logs, disc_params, prefix="discriminator ")
        if gan_on and do_step:
            if self._update_ok["d"]:
                # Through the strategy (precision plugin: grad scaling, the clipping hook) but not
                # LightningOptimizer.step, which would count it in trainer.global_step as well.
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure)
            opt_d.zero_grad(set_to_none=True)

        if do_step:
            self._end_optimizer_step(step)
            for sch in self._schedulers():
                sch.step()
            done = step + 1  # steps completed: the number the metrics and checkpoints of this step carry
            if self.hparams.sample_every_n_steps and done % self.hparams.sample_every_n_steps == 0:
                if self.trainer.is_global_zero and self.loggers:
                    log_image_grid(self.loggers, "train/samples", [x, recon.detach()], done, "input | reconstruction")

        self.last_logs = logs
        self.log_dict({f"train/{name}": v for name, v in logs.items()}, on_step=True, batch_size=x.shape[0])
        self.log("train/lr", opt_g.optimizer.param_groups[0]["lr"], on_step=True, batch_size=x.shape[0])

    def _generator_pass(self, x: torch.Tensor, opt_g, step: int, do_step: bool, gan_on: bool):
        """Generator forward/backward, codebook upkeep and (at ``do_step``) the generator update and EMA.

        Returns the reconstructions ``(B,3,S,S)`` and the logged terms. A non-finite loss or
        gradient marks the step as skipped (see :mod:`~codeformer_lightning.training.nonfinite`).
        """
        k = self.hparams.accumulate_grad_batches
        quantizer = self.net.quantize
        # toggle_model: the discriminator's parameters get no gradients here
        with opt_g.toggle_model(sync_grad=do_step):
            z, _ = self.net.encoder(x)
            if self.codebook.before_quantize(quantizer, z, step):
                self._codebook_rows_changed(opt_g, None)
            q = quantizer(z)
            recon = self.net.generator(q.quantized)
            g_loss, logs = self.loss.generator_loss(
                x, recon, q.loss, self.discriminator if gan_on else None, self.net.generator.last_layer
            )
            self.manual_backward(g_loss / k)
        finite = self.nonfinite.check(self, logs, self.net.parameters() if do_step else None)
        if finite:
            self.codebook.after_backward(quantizer, z, q.indices, step)
            self._epoch_counts += q.counts.to(self._epoch_counts.device)
        else:  # nothing of this step is learned, by the discriminator either
            self._update_ok.update(g=False, d=False)
        logs.update(perplexity=q.perplexity.detach(), code_usage=q.usage.detach())

        if do_step:
            learn = self._update_ok["g"]
            if not learn:
                skip_update(self, self.net.parameters())
            opt_g.step()  # also when skipped: trainer.global_step counts steps
            opt_g.zero_grad(set_to_none=True)
            if learn:
                restarted = self.codebook.restart_dead_codes(quantizer, step)
                if restarted.numel():
                    self._codebook_rows_changed(opt_g, restarted)
                if self.codebook.dead_code_steps > 0:
                    logs["restarted_codes"] = torch.tensor(float(restarted.numel()))
                self.ema.update(self.net)
        return recon, logs

    def _end_optimizer_step(self, step: int) -> None:
        if not all(self._update_ok.values()):
            self._disc_stats.restore()  # the skipped forward passes leave no trace in BatchNorm statistics
        self._disc_stats = None
        self._update_ok = {"g": True, "d": True}
        self.nonfinite.end_step(self, step)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._epoch_counts.float(), reduce_op="sum")
        perplexity, usage = code_statistics(counts)
        self.log_dict(
            {
                "train/epoch_perplexity": perplexity,
                "train/epoch_code_usage": usage,
                "train/epoch_dead_codes": (counts == 0).sum().float(),
                # the loggers' step (see training.numbering): Lightning logs epoch ends at steps - 1
                "step": float(self.global_step),
            },
            on_epoch=True,
        )
        if self.trainer.is_global_zero:
            log_code_histogram(self.loggers, "train/code_histogram", counts, self.global_step)

    # ------------------------------------------------------------------------- validation / export
    def validation_step(self, batch, batch_idx: int) -> None:
        x = self._images(batch)
        recon, q = self.ema.module(x)
        recon = recon.float().clamp(-1, 1)
        x = x.float()
        self.val_psnr((recon + 1) / 2, (x + 1) / 2)
        self.val_ssim((recon + 1) / 2, (x + 1) / 2)
        n = x.shape[0]
        self.log("val/psnr", self.val_psnr, on_epoch=True, batch_size=n)
        self.log("val/ssim", self.val_ssim, on_epoch=True, batch_size=n)
        self.log("val/l1", F.l1_loss(recon, x), on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/perplexity", q.perplexity, on_epoch=True, batch_size=n, sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.loggers:
            log_image_grid(self.loggers, "val/samples", [x, recon], self.global_step, "input | EMA reconstruction")

    def export(self, path: str | Path) -> Path:
        """Write the EMA autoencoder as ``.safetensors`` (read by :func:`load_pretrained`, used by stage II)."""
        return save_weights(self.ema.module, path)

    def export_discriminator(self, path: str | Path) -> Path | None:
        """Write the discriminator as ``.safetensors`` (the published stage III starts from it:
        ``model.discriminator_from``); None without a discriminator."""
        return None if self.discriminator is None else save_weights(self.discriminator, path)

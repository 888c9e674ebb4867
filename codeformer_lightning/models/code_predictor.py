"""Stage II: predict the clean face's code sequence from a degraded face (fidelity weight w = 0).

Also the hand-over helpers the later stages share: loading a stage I autoencoder into a CodeFormer
(:func:`copy_autoencoder`), loading CodeFormer weights (:func:`load_codeformer`) and the code
losses (:func:`code_losses`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image import PeakSignalNoiseRatio

from ..checkpoints import CheckpointError, check_variant, load_pretrained, load_state_strict, save_weights
from ..losses import LPIPS, SettingNames
from ..nn import CodeFormer, VQAutoEncoder
from ..training import EMA, log_image_grid
from ..training.nonfinite import NonFiniteGuard, skip_update
from .latent_codes import CodeTargetEncoder
from .stage import StageModule
from .vqgan import _plain_param_groups

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], torch.optim.lr_scheduler.LRScheduler]

#: Constructor arguments that must agree between a stage I autoencoder and the CodeFormer it seeds
#: (``beta`` only weighs a stage I loss term).
_AUTOENCODER_KEYS = (
    "img_size", "nf", "ch_mult", "res_blocks", "attn_resolutions", "codebook_size", "emb_dim", "norm_groups",
    "l2_normalize",
)  # fmt: skip


# ----------------------------------------------------------------------------- hand-over helpers
def load_autoencoder(path: str | Path) -> VQAutoEncoder:
    """A stage I weight file (our ``.safetensors`` or the published ``vqgan_code1024.pth``)."""
    model = load_pretrained(path)
    if type(model) is not VQAutoEncoder:
        raise CheckpointError(
            f"{path}: holds a {type(model).__name__} ({getattr(model, 'variant', '?')}), but autoencoder= expects a "
            "stage I autoencoder (VQAutoEncoder) such as the stage I export or vqgan_code1024.pth; start from "
            "CodeFormer weights with init_from= instead"
        )
    return model


def _config_mismatch(a: Mapping, b: Mapping, keys: Iterable[str]) -> list[str]:
    # configs record l2_normalize only when set (published-layout configs stay as they were)
    a, b = {"l2_normalize": False, **a}, {"l2_normalize": False, **b}

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return [f"{k}: {norm(a[k])} vs {norm(b[k])}" for k in keys if k in a and k in b and norm(a[k]) != norm(b[k])]


def copy_autoencoder(net: CodeFormer, autoencoder: VQAutoEncoder, source: str = "autoencoder") -> None:
    """Copy a stage I autoencoder into ``net``: codebook, generator, and the LQ encoder (from the HQ encoder)."""
    mismatch = _config_mismatch(autoencoder.config, net.config, _AUTOENCODER_KEYS)
    if mismatch:
        raise CheckpointError(
            f"{source}: the stage I autoencoder does not fit the CodeFormer being trained ({'; '.join(mismatch)} "
            "as autoencoder vs model.net); make model.net's autoencoder settings match the stage I run"
        )
    for part in ("encoder", "quantize", "generator"):
        load_state_strict(getattr(net, part), getattr(autoencoder, part).state_dict(), f"{source} ({part})")


def load_codeformer(net: CodeFormer, path: str | Path) -> None:
    """Load CodeFormer weights (a stage II/III export or the published ``codeformer.pth``) into ``net``."""
    model = load_pretrained(path)
    if type(model) is not CodeFormer:
        raise CheckpointError(
            f"{path}: holds a {type(model).__name__}, but init_from= expects CodeFormer weights (a stage II/III "
            "export or codeformer.pth); start from a stage I autoencoder with autoencoder= instead"
        )
    keys = set(model.config) - {"beta"}
    mismatch = _config_mismatch(model.config, net.config, sorted(keys))
    if mismatch:
        raise CheckpointError(
            f"{path}: the CodeFormer in this file does not fit model.net ({'; '.join(mismatch)} as file vs "
            "model.net); set model.net to the file's architecture"
        )
    load_state_strict(net, model.state_dict(), str(path))


def code_losses(
    net: CodeFormer,
    logits: torch.Tensor,
    lq_feat: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: float,
    feat_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight * CE(logits, targets) + feat_weight * MSE(lq_feat, codebook[targets])``.

    ``logits`` ``(B, L, K)``, ``lq_feat`` ``(B, D, s, s)``, ``targets`` ``(B, L)`` long. The codebook
    features are a fixed target (detached). Returns the weighted total and the detached raw terms
    plus top-1 accuracy (keys ``ce``, ``feat``, ``code_acc``).
    """
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"target codes {tuple(targets.shape)} do not match the logits {tuple(logits.shape[:2])}")
    ce = F.cross_entropy(rearrange(logits, "b l k -> b k l").float(), targets)
    target_feat = net.quantize.lookup(targets, tuple(lq_feat.shape[-2:])).detach()
    feat = F.mse_loss(lq_feat.float(), target_feat.float())
    total = ce_weight * ce + feat_weight * feat
    acc = (logits.detach().argmax(-1) == targets).float().mean()
    return total, {"ce": ce.detach(), "feat": feat.detach(), "code_acc": acc}


def target_codes(
    batch: Mapping[str, torch.Tensor], encoder: CodeTargetEncoder | None, length: int
) -> torch.Tensor:
    """Target codes ``(B, L)`` long: ``batch["codes"]`` when present, else ``encoder(batch["gt"])``."""
    if "codes" in batch and batch["codes"] is not None:
        codes = batch["codes"].long().reshape(batch["codes"].shape[0], -1)
    elif encoder is not None:
        codes = encoder(batch["gt"])
    else:
        raise ValueError(
            "no target codes: the batch has no 'codes' (no latent-code file given to the data module) and no "
            "stage I autoencoder was given (model.autoencoder=/path/to/vqgan.safetensors or vqgan_code1024.pth)"
        )
    if codes.shape[1] != length:
        raise ValueError(f"target codes have {codes.shape[1]} positions per image, the network predicts {length}")
    return codes


#: the config keys of the validation LPIPS, for the hints of its error messages
_LPIPS_SETTINGS = SettingNames(
    weights="model.perceptual_weights",
    heads="model.perceptual_linear_weights",
    uniform_heads=None,
    off="model.perceptual_weights=null",
)


def _published_stage2_adam(params: Iterable[nn.Parameter]) -> Optimizer:
    return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.99))


class CodePredictorModule(StageModule):
    """Stage II: trains CodeFormer's LQ encoder, Transformer and code head on degraded faces.

    Batches: ``{"lq": (B,3,S,S), "gt": (B,3,S,S)}`` in [-1,1], optionally ``"codes"`` ``(B, L)`` long
    (from a latent-code file; then the clean image is not encoded). Other keys (``"mask"``,
    ``"name"``) are ignored. Loss: ``ce_weight * CE(codes) + feat_weight * MSE(lq_feat, codebook
    features of the target codes)``; the fusion path is never run (w = 0).

    Frozen: codebook (``quantize``), ``generator`` and the fusion blocks (trained in stage III).
    The optimiser receives only the parameters that require gradients.

    Args:
        net: the CodeFormer to train (its autoencoder settings must match the stage I model).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true``); default Adam lr 1e-4,
            betas (0.9, 0.99) as published.
        scheduler: ``optimizer -> LRScheduler``, stepped every step (published: MultiStepLR at
            400k/450k, gamma 0.5); None: constant.
        autoencoder: stage I weight file (``.safetensors`` export or ``vqgan_code1024.pth``): copied
            into ``net`` (LQ encoder initialised from the HQ encoder) and kept as the frozen
            target encoder. Needed unless every batch carries ``"codes"``.
        init_from: CodeFormer weights to start from instead (e.g. ``codeformer.pth`` to fine-tune);
            loaded after ``autoencoder``.
        ce_weight, feat_weight: published 0.5 and 1.0.
        ema_decay: EMA of the whole network (published 0.995); validation and export use it.
        perceptual_weights, perceptual_linear_weights: LPIPS weight files; when given, validation
            also logs the LPIPS of the w = 0 restorations.
        val_adain: restore validation images with AdaIN (as published inference does).
        max_nonfinite_steps: stop after this many consecutive steps with a NaN/inf loss or gradient
            (such steps are skipped, see :mod:`~codeformer_lightning.training.nonfinite`); None: never.
        variant: the task the weights are for (``restoration``, ``colorization``, ``inpainting``),
            written into the export and the checkpoints: ``load_pretrained`` and the restorer then apply
            that task's published inference settings (None: not recorded, read as restoration).

    Checkpoints record ``net`` (class and constructor config) and the frozen target encoder:
    ``CodePredictorModule.load_from_checkpoint(ckpt)`` rebuilds them without reading the weight files again
    (see :mod:`.stage`).
    """

    network_args = ("net",)

    @classmethod
    def file_free_kwargs(cls, networks: dict) -> dict:
        return {"autoencoder": None, "init_from": None}

    def __init__(
        self,
        net: CodeFormer,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        autoencoder: str | None = None,
        init_from: str | None = None,
        ce_weight: float = 0.5,
        feat_weight: float = 1.0,
        ema_decay: float = 0.995,
        perceptual_weights: str | None = None,
        perceptual_linear_weights: str | None = None,
        val_adain: bool = False,
        max_nonfinite_steps: int | None = 20,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.targets: CodeTargetEncoder | None = None
        if autoencoder:
            stage1 = load_autoencoder(autoencoder)
            copy_autoencoder(net, stage1, str(autoencoder))
            self.targets = CodeTargetEncoder(stage1)
        if init_from:
            load_codeformer(net, init_from)
        net.quantize.requires_grad_(False)
        net.generator.requires_grad_(False)
        net.fusion.requires_grad_(False)
        self.optimizer_factory = optimizer or _published_stage2_adam
        self.scheduler_factory = scheduler
        self.ema = EMA(net, ema_decay)
        self.lpips = None
        if perceptual_weights:
            self.lpips = LPIPS(perceptual_weights, perceptual_linear_weights, names=_LPIPS_SETTINGS)
        self.val_acc = MulticlassAccuracy(num_classes=net.quantize.codebook_size, average="micro")
        self.val_ce = MeanMetric()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.val_lpips = MeanMetric()
        self.last_logs: dict[str, torch.Tensor] = {}
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self._learn = True

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = _plain_param_groups(self.optimizer_factory(params))
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ------------------------------------------------------------------------- steps
    def target_codes(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``batch["codes"]`` if present, else the frozen stage I encoder's codes of ``batch["gt"]``."""
        return target_codes(batch, self.targets, self.net.latent_size**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Code logits ``(B, L, K)`` of ``x`` ``(B,3,S,S)`` in [-1,1] by the EMA network."""
        return self.ema.module.predict_codes(x)[0]

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        codes = self.target_codes(batch)
        logits, lq_feat = self.net.predict_codes(batch["lq"])
        loss, logs = code_losses(self.net, logits, lq_feat, codes, self.hparams.ce_weight, self.hparams.feat_weight)
        self.last_logs = dict(logs, loss=loss.detach())
        n = codes.shape[0]
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # after the backward pass (and fp16 unscaling), before the update: a NaN/inf loss or
        # gradient makes the update a no-op (see training.nonfinite)
        self._learn = self.nonfinite.check(self, self.last_logs, self.net.parameters())
        if not self._learn:
            skip_update(self, self.net.parameters())

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA moves right after each optimiser step (once per step with gradient accumulation),
        # inside the batch: checkpoint callbacks run in on_train_batch_end, so a checkpoint then holds
        # the EMA of the same step as the weights and a resumed run continues the same average.
        step = self.global_step
        self._learn = True
        super().optimizer_step(*args, **kwargs)
        if self._learn:
            self.ema.update(self.net)
        self.nonfinite.end_step(self, step)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        net = self.ema.module
        lq, gt = batch["lq"], batch["gt"]
        codes = self.target_codes(batch)
        logits, _ = net.predict_codes(lq)
        n = lq.shape[0]
        self.val_acc(rearrange(logits, "b l k -> (b l) k"), codes.reshape(-1))
        self.val_ce(F.cross_entropy(rearrange(logits, "b l k -> b k l").float(), codes))
        restored = net.restore(lq, w=0.0, adain=self.hparams.val_adain).image.float().clamp(-1, 1)
        self.val_psnr((restored + 1) / 2, (gt.float() + 1) / 2)
        self.log("val/code_acc", self.val_acc, on_epoch=True, batch_size=n)
        self.log("val/ce", self.val_ce, on_epoch=True, batch_size=n)
        self.log("val/psnr", self.val_psnr, on_epoch=True, batch_size=n)
        if self.lpips is not None:
            self.val_lpips(self.lpips(restored, gt.float()))
            self.log("val/lpips", self.val_lpips, on_epoch=True, batch_size=n)
        if batch_idx == 0 and self.trainer.is_global_zero and self.loggers:
            log_image_grid(self.loggers, "val/samples", [lq, restored, gt], self.global_step, "input | w=0 | target")

    def export(self, path: str | Path) -> Path:
        """Write the EMA CodeFormer as ``.safetensors`` (stage III's ``init_from``)."""
        return save_weights(self.ema.module, path, variant=self.hparams.get("variant"))


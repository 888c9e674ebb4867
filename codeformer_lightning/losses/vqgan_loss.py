"""The stage I (VQGAN) objective: L1 + LPIPS + codebook + adaptively weighted hinge GAN."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .perceptual import BUNDLED_HEADS, LPIPS, SettingNames


def _optional_str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


class VQGANLoss(nn.Module):
    """Generator and discriminator losses of VQGAN training (published weights by default).

    Generator: ``pixel_weight * L1 + perceptual_weight * LPIPS + codebook_weight * codebook
    + gan_weight * w * hinge_g``, where ``w`` is the adaptive weight
    ``||grad rec|| / ||grad gan||`` at the decoder's last layer clamped to ``[0, adaptive_weight_max]``
    (``rec`` = the L1 + LPIPS part). The published recipe: 1.0, 1.0, 1.0, 0.8 (``disc_weight``) with
    max 1.0. The discriminator itself is passed in by the caller (it has its own optimiser).

    Args:
        perceptual_weight: 0 disables LPIPS entirely (no VGG weights needed).
        perceptual_weights_path, perceptual_linear_weights_path, perceptual_imagenet_prenorm,
        perceptual_uniform_heads: passed to :class:`~codeformer_lightning.losses.perceptual.LPIPS`
            (heads: ``None`` = the published v0.1 heads shipped with the package).
        perceptual: an already built LPIPS to use instead (shared with a metric); the path
            arguments are then unused.
        hint_prefix: where this loss's settings sit in the caller's config (``model.loss.`` in the
            stage I config), so error messages name keys that exist.
        adaptive_weight: False uses ``w = 1``.

    All terms take images ``(B, 3, H, W)`` in [-1, 1]; the returned dicts hold detached scalars.
    """

    def __init__(
        self,
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        gan_weight: float = 0.8,
        adaptive_weight: bool = True,
        adaptive_weight_max: float = 1.0,
        perceptual_weights_path: str | Path | None = None,
        perceptual_linear_weights_path: str | Path | None = None,
        perceptual_imagenet_prenorm: bool = False,
        perceptual_uniform_heads: bool = False,
        perceptual: LPIPS | None = None,
        hint_prefix: str = "",
    ) -> None:
        super().__init__()
        self.pixel_weight = pixel_weight
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.gan_weight = gan_weight
        self.adaptive_weight = adaptive_weight
        self.adaptive_weight_max = adaptive_weight_max
        shared = perceptual is not None
        if perceptual is None and perceptual_weight > 0:
            names = SettingNames(
                weights=f"{hint_prefix}perceptual_weights_path",
                heads=f"{hint_prefix}perceptual_linear_weights_path",
                uniform_heads=f"{hint_prefix}perceptual_uniform_heads",
                off=f"{hint_prefix}perceptual_weight=0",
            )
            perceptual = LPIPS(
                perceptual_weights_path,
                perceptual_linear_weights_path,
                perceptual_imagenet_prenorm,
                uniform_heads=perceptual_uniform_heads,
                names=names,
            )
        self.perceptual = perceptual if perceptual_weight > 0 else None
        # the constructor arguments (plain types), so a training checkpoint can rebuild this loss
        self.config = dict(
            pixel_weight=pixel_weight, perceptual_weight=perceptual_weight, codebook_weight=codebook_weight,
            gan_weight=gan_weight, adaptive_weight=adaptive_weight, adaptive_weight_max=adaptive_weight_max,
            perceptual_weights_path=_optional_str(perceptual_weights_path),
            perceptual_linear_weights_path=_optional_str(perceptual_linear_weights_path),
            perceptual_imagenet_prenorm=perceptual_imagenet_prenorm, perceptual_uniform_heads=perceptual_uniform_heads,
            hint_prefix=hint_prefix,
        )
        if shared and self.perceptual is not None:  # an LPIPS built elsewhere: record the files it read
            heads = self.perceptual.linear_weights_path
            self.config.update(
                perceptual_weights_path=str(self.perceptual.weights_path),
                perceptual_linear_weights_path=None if heads in (None, BUNDLED_HEADS) else str(heads),
                perceptual_uniform_heads=not self.perceptual.has_linear_heads,
                perceptual_imagenet_prenorm=self.perceptual.imagenet_prenorm,
            )

    def reconstruction_loss(
        self, real: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``pixel_weight * L1 + perceptual_weight * LPIPS`` (scalar) and its logged terms."""
        l1 = F.l1_loss(recon, real)
        loss = self.pixel_weight * l1
        logs = {"l1": l1.detach()}
        if self.perceptual is not None:
            lp = self.perceptual(recon, real).mean()
            loss = loss + self.perceptual_weight * lp
            logs["perceptual"] = lp.detach()
        return loss, logs

    def gan_term(
        self, rec_loss: torch.Tensor, fake_logits: torch.Tensor, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``gan_weight * w * hinge_g(fake_logits)`` with the adaptive ``w`` measured at ``last_layer``."""
        g_loss = hinge_g_loss(fake_logits)
        if self.adaptive_weight:
            if last_layer is None:
                raise ValueError("the adaptive GAN weight needs the decoder's last layer weight (last_layer)")
            w = adaptive_gan_weight(rec_loss, g_loss, last_layer, self.adaptive_weight_max)
        else:
            w = torch.ones((), device=g_loss.device)
        return self.gan_weight * w * g_loss, {"gan_g": g_loss.detach(), "adaptive_weight": w.detach()}

    def generator_loss(
        self,
        real: torch.Tensor,
        recon: torch.Tensor,
        codebook_loss: torch.Tensor,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and its terms. ``discriminator=None``: no GAN term (before it starts).

        Logged keys: ``l1``, ``perceptual`` (if on), ``codebook``, ``gan_g`` and ``adaptive_weight``
        (if a discriminator is given), ``total``.
        """
        rec, logs = self.reconstruction_loss(real, recon)
        total = rec + self.codebook_weight * codebook_loss
        logs["codebook"] = codebook_loss.detach()
        if discriminator is not None:
            gan, gan_logs = self.gan_term(rec, discriminator(recon), last_layer)
            total = total + gan
            logs.update(gan_logs)
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of ``discriminator`` on ``real`` vs ``fake`` (detached here).

        Real and fake go through separate forward passes, as published (BatchNorm statistics per
        pass). Logged keys: ``d_loss``, ``logits_real``, ``logits_fake`` (means).
        """
        real_logits = discriminator(real.detach())
        fake_logits = discriminator(fake.detach())
        loss = hinge_d_loss(real_logits, fake_logits)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": real_logits.detach().float().mean(),
            "logits_fake": fake_logits.detach().float().mean(),
        }

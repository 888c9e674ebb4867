"""Hinge GAN losses and the VQGAN adaptive generator-loss weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: ``-mean(D(fake))``."""
    return -fake_logits.mean()


def adaptive_gan_weight(
    recon_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1.0
) -> torch.Tensor:
    """``||grad recon|| / (||grad gan|| + 1e-4)`` at ``last_layer``, clamped to [0, max_weight], detached.

    Balances the GAN term against the reconstruction terms (Esser et al., VQGAN). Both losses must
    still have their graphs (``retain_graph`` is used). Returns 0 outside of grad mode (validation)
    and when a gradient is not finite (fp16 overflow: the GradScaler skips such a step anyway).
    """
    if not torch.is_grad_enabled() or not last_layer.requires_grad:
        return torch.zeros((), device=last_layer.device)
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = recon_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    return weight.clamp(0.0, max_weight).detach()

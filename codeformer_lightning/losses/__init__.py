"""Loss functions shared by the training stages."""

from .gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss

__all__ = ["adaptive_gan_weight", "hinge_d_loss", "hinge_g_loss"]

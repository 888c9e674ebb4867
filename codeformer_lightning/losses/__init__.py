"""Loss functions shared by the training stages."""

from .gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .perceptual import LPIPS, SettingNames
from .vqgan_loss import VQGANLoss

__all__ = ["LPIPS", "SettingNames", "VQGANLoss", "adaptive_gan_weight", "hinge_d_loss", "hinge_g_loss"]

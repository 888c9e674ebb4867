"""The published PatchGAN discriminator."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: image ``(B, 3, H, W)`` in [-1, 1] -> logits ``(B, 1, H/2**n_layers - 2, ...)``.

    conv4x4 s2 + LeakyReLU(0.2); ``n_layers - 1`` x [conv4x4 s2 (no bias), BatchNorm, LeakyReLU] with
    channels ``ndf * min(2**n, 8)``; conv4x4 s1 (no bias), BatchNorm, LeakyReLU; conv4x4 s1 -> 1.
    The layers live in one ``nn.Sequential`` named ``main`` (the published key layout).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 4) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, ndf=ndf, n_layers=n_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)

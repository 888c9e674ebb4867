"""Convolutional building blocks shared by the encoder, the generator and the fusion blocks.

Attribute names (``norm1``, ``conv1``, ``q``, ``proj_out``, ...) follow the published weight layout so
that converting a published file only has to rename the *prefix* of each key.

Each block has a plain ``forward`` (training, GPU, export) and, on CPU without autograd, a fused
oneDNN path with the same result (see :mod:`codeformer_lightning.nn.fused`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import fused


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the published settings (eps 1e-6, affine)."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels ({channels}) divisible by norm_groups ({groups})")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) x 2, 1x1 ``conv_out`` skip when channels change.

    ``(B, in_ch, H, W) -> (B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, norm_groups: int = 32) -> None:
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.in_ch, self.out_ch = in_ch, out_ch
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_out = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_cpu_inference(x):
            return self._fused_forward(x)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_out is None else self.conv_out(x)
        return skip + h

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fused.channels_last(x)
        h = fused.conv(self.conv1, fused.group_norm_silu(self.norm1, x))
        h = fused.group_norm_silu(self.norm2, h)
        skip = x if self.conv_out is None else fused.conv(self.conv_out, x)
        return fused.conv(self.conv2, h, add=skip)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, residual. ``(B,C,H,W) -> (B,C,H,W)``."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fused.fast_cpu_inference(x)
        if fast:
            x = fused.channels_last(x)
        _, _, h, w = x.shape
        z = self.norm(x)
        projs = (self.q, self.k, self.v)
        q, k, v = (rearrange(fused.conv(p, z) if fast else p(z), "b c h w -> b 1 (h w) c") for p in projs)
        # SDPA's default scale is 1/sqrt(C): the published c**-0.5.
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        if fast:  # the attention output is (B, HW, C) in memory: already channels_last
            return fused.conv(self.proj_out, out, add=x)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, conv3x3 stride 2 (published asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_cpu_inference(x):
            return fused.conv(self.conv, F.pad(fused.channels_last(x), (0, 1, 0, 1)))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_cpu_inference(x):
            return fused.upsample_conv(self.conv, fused.channels_last(x))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

"""Nearest-neighbour vector quantizer (the VQGAN codebook)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class QuantizerOutput:
    """What :class:`VectorQuantizer` returns.

    quantized: ``(B, D, h, w)`` codebook vectors, straight-through gradient to the input.
    loss: scalar, codebook + ``beta`` * commitment.
    indices: ``(B, h*w)`` long, row-major code indices.
    perplexity: scalar, exp(entropy) of the code histogram of this batch (1 .. codebook_size).
    usage: scalar, fraction of the codebook used in this batch (0 .. 1).
    counts: ``(codebook_size,)`` long, how often each code was chosen in this batch.
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    counts: torch.Tensor


def code_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and used fraction of a code histogram ``counts`` (K,)."""
    probs = counts.float() / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    usage = (counts > 0).float().mean()
    return perplexity, usage


class VectorQuantizer(nn.Module):
    """Maps each feature vector to its nearest codebook entry (squared L2).

    Args:
        codebook_size: number of codes K.
        emb_dim: code dimension D.
        beta: weight of the commitment term ``mse(zq, sg[z])``.
    """

    def __init__(self, codebook_size: int = 1024, emb_dim: int = 256, beta: float = 0.25) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.emb_dim = emb_dim
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``(N,)`` of the nearest codes to the rows of ``z`` ``(N, D)``."""
        codebook = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, the same expansion the published code uses (keeps tie-breaking equal).
        dist = (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)).addmm(z, codebook.t(), alpha=-2)
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, D, h, w)``."""
        b, d, h, w = z.shape
        if d != self.emb_dim:
            raise ValueError(f"VectorQuantizer expects {self.emb_dim} channels, got {d}")
        flat = rearrange(z, "b d h w -> (b h w) d")
        with torch.no_grad():
            indices = self.nearest_codes(flat)
        zq = rearrange(self.embedding(indices), "(b h w) d -> b d h w", b=b, h=h, w=w)
        loss = F.mse_loss(zq.detach(), z) + self.beta * F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        counts = torch.bincount(indices, minlength=self.codebook_size)
        perplexity, usage = code_statistics(counts)
        return QuantizerOutput(zq, loss, indices.view(b, h * w), perplexity, usage, counts)

    def lookup(self, indices: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Codebook vectors for ``indices`` ``(B, h*w)`` (or ``(B, h, w)``) -> ``(B, D, h, w)``."""
        h, w = hw
        feats = self.embedding(indices.reshape(indices.shape[0], h * w))
        return rearrange(feats, "b (h w) d -> b d h w", h=h, w=w)

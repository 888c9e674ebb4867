"""Nearest-neighbour vector quantizer (the VQGAN codebook) and its training-time upkeep.

:class:`VectorQuantizer` is the inference-relevant part (saved with the autoencoder's weights). With
``l2_normalize=False`` (the default) it is the published quantizer, bit for bit.

:class:`CodebookTrainer` holds what only training needs (k-means initialisation, dead-code restart,
EMA codebook updates) and its state; the stage I LightningModule owns it, so exported weights never
carry it. It is plain ``torch``: under ``torch.distributed`` it sums statistics across ranks and
broadcasts every codebook change from rank 0, so each rank holds the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
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
        l2_normalize: cosine codes: inputs and codes are projected onto the unit sphere before the
            search, and the quantized output is the unit-norm code (Yu et al., ViT-VQGAN). Off in
            the published model.
    """

    def __init__(
        self, codebook_size: int = 1024, emb_dim: int = 256, beta: float = 0.25, l2_normalize: bool = False
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.emb_dim = emb_dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` -> the ``(B*h*w, D)`` rows the codebook is matched against (unit norm if cosine)."""
        flat = rearrange(z, "b d h w -> (b h w) d")
        return F.normalize(flat, dim=1) if self.l2_normalize else flat

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors ``(..., D)`` for ``indices`` ``(...)`` (unit norm if cosine)."""
        e = self.embedding(indices)
        return F.normalize(e, dim=-1) if self.l2_normalize else e

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``(N,)`` of the nearest codes to the rows of ``z`` ``(N, D)``."""
        # Under autocast a bf16/fp16 distance would pick wrong codes; fp32 inputs make this a no-op.
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            codebook = self.embedding.weight.float()
            if self.l2_normalize:
                z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
            # |z|^2 + |e|^2 - 2 z.e, the same expansion the published code uses (keeps tie-breaking equal).
            dist = (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)).addmm(z, codebook.t(), alpha=-2)
            return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, D, h, w)``."""
        b, d, h, w = z.shape
        if d != self.emb_dim:
            raise ValueError(f"VectorQuantizer expects {self.emb_dim} channels, got {d}")
        flat = self.flatten(z)
        if self.l2_normalize:
            # the loss and the straight-through estimate act on the projected input
            z = rearrange(flat, "(b h w) d -> b d h w", b=b, h=h, w=w)
        with torch.no_grad():
            indices = self.nearest_codes(flat)
        zq = rearrange(self.codes(indices), "(b h w) d -> b d h w", b=b, h=h, w=w)
        loss = F.mse_loss(zq.detach(), z) + self.beta * F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        counts = torch.bincount(indices, minlength=self.codebook_size)
        perplexity, usage = code_statistics(counts)
        return QuantizerOutput(zq, loss, indices.view(b, h * w), perplexity, usage, counts)

    def lookup(self, indices: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Codebook vectors for ``indices`` ``(B, h*w)`` (or ``(B, h, w)``) -> ``(B, D, h, w)``."""
        h, w = hw
        feats = self.codes(indices.reshape(indices.shape[0], h * w))
        return rearrange(feats, "b (h w) d -> b d h w", h=h, w=w)


# ----------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_min(value: int, device: torch.device) -> int:
    if not _distributed():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) over ranks along dim 0, in rank order."""
    if not _distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite ``t`` in place with rank 0's copy (float kernels may differ in the last bit across GPUs)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1)).addmm(x, c.t(), alpha=-2).clamp_min_(0)


def kmeans(
    x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None, cosine: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``x`` ``(N, D)`` -> centroids ``(k, D)`` and cluster sizes ``(k,)``.

    k-means++ seeding (Arthur & Vassilvitskii 2007) then ``iters`` Lloyd iterations; an empty
    cluster keeps its previous centroid. ``cosine``: spherical k-means (unit-norm centroids, inputs
    assumed unit norm). Random draws come from the CPU ``generator`` (reproducible on any device).
    """
    x = x.float()
    uniforms = torch.rand(k, generator=generator).to(x.device)
    centroids = x.new_empty(k, x.shape[1])
    first = int(uniforms[0].item() * x.shape[0]) % x.shape[0]
    centroids[0] = x[first]
    d2 = _sq_dist(x, centroids[:1]).squeeze(1)
    for i in range(1, k):
        # draw a row with probability proportional to its squared distance to the nearest centroid
        cdf = d2.cumsum(0)
        idx = torch.searchsorted(cdf, (uniforms[i] * cdf[-1]).reshape(1)).clamp_max(x.shape[0] - 1)
        centroids[i] = x[idx[0]]
        d2 = torch.minimum(d2, _sq_dist(x, centroids[i : i + 1]).squeeze(1))
    sizes = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        assign = _sq_dist(x, centroids).argmin(dim=1)
        sizes = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    return centroids, sizes


class CodebookTrainer(nn.Module):
    """Training-time upkeep of a :class:`VectorQuantizer`'s codebook (all options off by default).

    * ``kmeans_init``: once ``kmeans_min_samples`` encoder outputs have been seen (on all ranks
      together), the codebook is set to their k-means centroids.
    * ``dead_code_steps``: a code no rank has chosen for that many consecutive steps is restarted
      from a random recent encoder output (a ring buffer of ``buffer_size`` rows, gathered from all
      ranks), and gets as many steps of grace.
    * ``ema_decay``: the codebook follows an exponential moving average of the vectors assigned to
      each code (van den Oord et al. 2017, appendix) instead of the codebook loss; the caller must
      freeze ``embedding.weight`` and leave it out of the optimiser.

    Call :meth:`before_quantize` with the encoder output before quantizing it and
    :meth:`after_backward` with its codes after the backward pass; :meth:`restart_dead_codes` at an
    optimiser step. Every rank must make the same calls (they contain collectives when distributed).
    Random choices use generators seeded from ``(seed, step)``, so a resumed run repeats them. The
    state (buffers) is saved in training checkpoints.
    """

    def __init__(
        self,
        codebook_size: int,
        emb_dim: int,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_min_samples: int | None = None,
        dead_code_steps: int = 0,
        ema_decay: float | None = None,
        ema_eps: float = 1e-5,
        buffer_size: int = 4096,
        samples_per_step: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"codebook ema_decay must lie in (0, 1) or be None, got {ema_decay}")
        self.codebook_size = codebook_size
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.kmeans_min_samples = kmeans_min_samples or 4 * codebook_size
        self.dead_code_steps = dead_code_steps
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.samples_per_step = samples_per_step
        self.seed = seed
        needs_buffer = kmeans_init or dead_code_steps > 0
        if kmeans_init and buffer_size < self.kmeans_min_samples:
            buffer_size = self.kmeans_min_samples
        self.register_buffer("code_buffer", torch.zeros(buffer_size if needs_buffer else 0, emb_dim))
        self.register_buffer("buffer_seen", torch.zeros((), dtype=torch.long))  # rows ever pushed
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("ema_ready", torch.tensor(False))
        self.register_buffer("ema_cluster_size", torch.zeros(codebook_size if ema_decay else 0))
        self.register_buffer("ema_embed_sum", torch.zeros(codebook_size if ema_decay else 0, emb_dim))

    @property
    def enabled(self) -> bool:
        return self.kmeans_init or self.dead_code_steps > 0 or self.ema_decay is not None

    def _generator(self, step: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 17 + salt)

    def _buffer_rows(self) -> torch.Tensor:
        return self.code_buffer[: min(int(self.buffer_seen), self.code_buffer.shape[0])]

    @torch.no_grad()
    def _push(self, flat: torch.Tensor, step: int) -> None:
        if not bool(flat.isfinite().all()):
            # a non-finite batch (its step will be skipped) must not poison k-means or restarts;
            # fewer rows here just lowers the count every rank pushes
            flat = flat[flat.isfinite().all(dim=1)]
        # the same count on every rank (all_gather needs equal shapes; a last batch may be short)
        n = _all_reduce_min(min(self.samples_per_step, self.code_buffer.shape[0], flat.shape[0]), flat.device)
        rows = torch.randperm(flat.shape[0], generator=self._generator(step, 1))[:n]
        new = _all_gather_cat(flat[rows.to(flat.device)].float())
        size = self.code_buffer.shape[0]
        pos = (int(self.buffer_seen) + torch.arange(new.shape[0], device=new.device)) % size
        # with more new rows than room, later writes win: the most recent rows stay
        self.code_buffer[pos[-size:]] = new[-size:]
        self.buffer_seen += new.shape[0]

    @torch.no_grad()
    def before_quantize(self, quantizer: VectorQuantizer, z: torch.Tensor, step: int) -> bool:
        """Record encoder outputs ``z`` ``(B, D, h, w)``; run the k-means initialisation when due.

        Returns True when the codebook was (re)initialised in this call.
        """
        if self.code_buffer.shape[0] == 0:
            return False
        with torch.autocast(z.device.type, enabled=False):
            self._push(quantizer.flatten(z.detach().float()), step)
            if bool(self.initialised) or int(self.buffer_seen) < self.kmeans_min_samples:
                return False
            centroids, _ = kmeans(
                self._buffer_rows(), self.codebook_size, self.kmeans_iters, self._generator(step, 2),
                cosine=quantizer.l2_normalize,
            )
            weight = quantizer.embedding.weight
            weight.copy_(_broadcast_(centroids.to(weight.dtype)))
            self.initialised.fill_(True)
            self.last_used.fill_(step)
            self.ema_ready.fill_(False)  # EMA statistics restart from the new codebook
        return True

    @torch.no_grad()
    def after_backward(self, quantizer: VectorQuantizer, z: torch.Tensor, indices: torch.Tensor, step: int) -> None:
        """Update usage (and the EMA codebook) from encoder outputs ``z`` and their codes ``indices``."""
        if not self.enabled:
            return
        with torch.autocast(z.device.type, enabled=False):
            flat_idx = indices.reshape(-1)
            counts = _all_reduce_sum(torch.bincount(flat_idx, minlength=self.codebook_size).float())
            self.last_used[counts > 0] = step
            if self.ema_decay is None or not bool(self.initialised):
                return
            weight = quantizer.embedding.weight
            if not bool(self.ema_ready):
                self.ema_cluster_size.fill_(1.0)
                self.ema_embed_sum.copy_(weight.float())
                self.ema_ready.fill_(True)
            flat = quantizer.flatten(z.detach().float())
            sums = _all_reduce_sum(torch.zeros_like(self.ema_embed_sum).index_add_(0, flat_idx, flat))
            self.ema_cluster_size.lerp_(counts, 1.0 - self.ema_decay)
            self.ema_embed_sum.lerp_(sums, 1.0 - self.ema_decay)
            n = self.ema_cluster_size.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            size = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
            new = self.ema_embed_sum / size[:, None]
            if quantizer.l2_normalize:
                new = F.normalize(new, dim=1)
            weight.copy_(new.to(weight.dtype))

    @torch.no_grad()
    def dead_codes(self, step: int) -> torch.Tensor:
        """Indices of the codes unused for ``dead_code_steps`` steps (empty when restarts are off)."""
        if self.dead_code_steps <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.last_used.device)
        return torch.nonzero(step - self.last_used >= self.dead_code_steps).flatten()

    @torch.no_grad()
    def restart_dead_codes(self, quantizer: VectorQuantizer, step: int) -> torch.Tensor:
        """Move dead codes onto random recent encoder outputs; returns their indices ``(n,)``."""
        dead = self.dead_codes(step)
        pool = self._buffer_rows()
        if dead.numel() == 0 or pool.shape[0] == 0 or not bool(self.initialised):
            return dead[:0]
        g = self._generator(step, 3)
        pick = torch.randperm(pool.shape[0], generator=g)[: dead.numel()] if pool.shape[0] >= dead.numel() else (
            torch.randint(pool.shape[0], (dead.numel(),), generator=g)
        )
        new = _broadcast_(pool[pick.to(pool.device)].clone())
        weight = quantizer.embedding.weight
        weight[dead] = new.to(weight.dtype)
        self.last_used[dead] = step
        if self.ema_decay is not None and bool(self.ema_ready):
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new
        return dead

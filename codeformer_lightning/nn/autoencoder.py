"""The stage I VQ autoencoder: encoder, vector quantizer and generator (decoder).

The encoder and generator are built as *levels* (one per resolution) that hand out / accept their
features by resolution, so the restoration network never needs hard-coded block indices. The
published flat block layout (``encoder.blocks.N``) exists only at the load/save boundary: see
``flat_modules()`` and :mod:`codeformer_lightning.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .blocks import AttnBlock, Downsample, ResBlock, Upsample, group_norm
from .quantizer import QuantizerOutput, VectorQuantizer

#: ``fuse(resolution, features) -> features``: a hook the generator calls once per level.
FuseHook = Callable[[int, torch.Tensor], torch.Tensor]


def _call(enabled: bool, block: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``block(*args)``, as an activation checkpoint when ``enabled`` and autograd records.

    A checkpointed block keeps only its inputs for the backward pass and runs its forward again
    there (non-reentrant ``torch.utils.checkpoint``): less memory for one more forward.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class _Level(nn.Module):
    """``n`` ResBlocks, each optionally followed by attention, then an optional resampling block."""

    def __init__(
        self, in_ch: int, out_ch: int, n_res: int, attention: bool, resample: nn.Module | None, groups: int
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_res)])
        self.attn = nn.ModuleList([AttnBlock(out_ch, groups) for _ in range(n_res)]) if attention else None
        self.resample = resample

    def flat_modules(self) -> list[nn.Module]:
        """Submodules in published execution order."""
        out: list[nn.Module] = []
        for i, res in enumerate(self.res):
            out.append(res)
            if self.attn is not None:
                out.append(self.attn[i])
        if self.resample is not None:
            out.append(self.resample)
        return out


class Encoder(nn.Module):
    """Image ``(B, 3, S, S)`` in [-1, 1] -> latent ``(B, emb_dim, S / 2**(L-1), S / 2**(L-1))``.

    ``L = len(ch_mult)`` levels; level ``i`` works at resolution ``S / 2**i`` with ``nf * ch_mult[i]``
    channels and its feature (for the fusion blocks) is the output of its last ResBlock.
    ``checkpoint_activations``: run each ResBlock, attention and resampling block as an activation
    checkpoint in training (less memory, one more forward of those blocks in the backward pass).
    """

    def __init__(
        self,
        img_size: int,
        nf: int,
        ch_mult: Sequence[int],
        res_blocks: int,
        attn_resolutions: Sequence[int],
        emb_dim: int,
        norm_groups: int = 32,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        self.conv_in = nn.Conv2d(3, nf, 3, padding=1)
        self.levels = nn.ModuleList()
        self.resolutions: list[int] = []
        in_ch, res = nf, img_size
        for i, mult in enumerate(ch_mult):
            out_ch = nf * mult
            last = i == len(ch_mult) - 1
            self.levels.append(
                _Level(in_ch, out_ch, res_blocks, res in attn_resolutions, None if last else Downsample(out_ch), norm_groups)
            )
            self.resolutions.append(res)
            in_ch = out_ch
            res = res if last else res // 2
        self.mid_res1 = ResBlock(in_ch, in_ch, norm_groups)
        self.mid_attn = AttnBlock(in_ch, norm_groups)
        self.mid_res2 = ResBlock(in_ch, in_ch, norm_groups)
        self.norm_out = group_norm(in_ch, norm_groups)
        self.conv_out = nn.Conv2d(in_ch, emb_dim, 3, padding=1)

    def forward(
        self, x: torch.Tensor, feature_resolutions: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns the latent and ``{resolution: (B, C_r, r, r)}`` for the requested resolutions."""
        feats: dict[int, torch.Tensor] = {}
        fast = fused.fast_cpu_inference(x)
        x = fused.conv(self.conv_in, fused.channels_last(x)) if fast else self.conv_in(x)
        ckpt = self.checkpoint_activations
        for res, level in zip(self.resolutions, self.levels):
            for i, block in enumerate(level.res):
                x = _call(ckpt, block, x)
                if i == len(level.res) - 1 and res in feature_resolutions:
                    feats[res] = x
                if level.attn is not None:
                    x = _call(ckpt, level.attn[i], x)
            if level.resample is not None:
                x = _call(ckpt, level.resample, x)
        for block in (self.mid_res1, self.mid_attn, self.mid_res2):
            x = _call(ckpt, block, x)
        # Published: no activation between the last norm and conv.
        if fast:  # the latent in the usual layout; the features stay channels_last for the fusion
            return fused.conv(self.conv_out, self.norm_out(x)).contiguous(), feats
        return self.conv_out(self.norm_out(x)), feats

    def flat_modules(self) -> list[nn.Module]:
        """Submodules in the published ``encoder.blocks.N`` order."""
        mods: list[nn.Module] = [self.conv_in]
        for level in self.levels:
            mods += level.flat_modules()
        return mods + [self.mid_res1, self.mid_attn, self.mid_res2, self.norm_out, self.conv_out]


class Generator(nn.Module):
    """Latent ``(B, emb_dim, s, s)`` -> image ``(B, 3, s * 2**(L-1), ...)`` (nominally in [-1, 1]).

    Levels run from the deepest (lowest resolution) to the shallowest. A ``fuse`` hook is applied
    once per level: after the first ResBlock, except at the latent resolution where it follows the
    last ResBlock (before its attention), which is where the published model fuses.
    ``checkpoint_activations``: as in :class:`Encoder`; the ``fuse`` calls are checkpointed too.
    """

    def __init__(
        self,
        img_size: int,
        nf: int,
        ch_mult: Sequence[int],
        res_blocks: int,
        attn_resolutions: Sequence[int],
        emb_dim: int,
        norm_groups: int = 32,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        n = len(ch_mult)
        in_ch = nf * ch_mult[-1]
        res = img_size // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(emb_dim, in_ch, 3, padding=1)
        self.mid_res1 = ResBlock(in_ch, in_ch, norm_groups)
        self.mid_attn = AttnBlock(in_ch, norm_groups)
        self.mid_res2 = ResBlock(in_ch, in_ch, norm_groups)
        self.levels = nn.ModuleList()
        self.resolutions: list[int] = []
        self.fuse_after: list[int] = []
        for i in reversed(range(n)):
            out_ch = nf * ch_mult[i]
            self.levels.append(
                _Level(in_ch, out_ch, res_blocks, res in attn_resolutions, Upsample(out_ch) if i else None, norm_groups)
            )
            self.resolutions.append(res)
            self.fuse_after.append(res_blocks - 1 if i == n - 1 else 0)
            in_ch = out_ch
            res = res * 2 if i else res
        self.norm_out = group_norm(in_ch, norm_groups)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, fuse: FuseHook | None = None) -> torch.Tensor:
        fast = fused.fast_cpu_inference(z)
        x = fused.conv(self.conv_in, fused.channels_last(z)) if fast else self.conv_in(z)
        ckpt = self.checkpoint_activations
        for block in (self.mid_res1, self.mid_attn, self.mid_res2):
            x = _call(ckpt, block, x)
        for res, level, fuse_at in zip(self.resolutions, self.levels, self.fuse_after):
            for i, block in enumerate(level.res):
                x = _call(ckpt, block, x)
                if fuse is not None and i == fuse_at:
                    x = _call(ckpt, fuse, res, x)
                if level.attn is not None:
                    x = _call(ckpt, level.attn[i], x)
            if level.resample is not None:
                x = _call(ckpt, level.resample, x)
        if fast:  # the image in the usual layout
            return fused.conv(self.conv_out, self.norm_out(x)).contiguous()
        return self.conv_out(self.norm_out(x))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: where the adaptive GAN weight measures gradient norms."""
        return self.conv_out.weight

    def flat_modules(self) -> list[nn.Module]:
        """Submodules in the published ``generator.blocks.N`` order."""
        mods: list[nn.Module] = [self.conv_in, self.mid_res1, self.mid_attn, self.mid_res2]
        for level in self.levels:
            mods += level.flat_modules()
        return mods + [self.norm_out, self.conv_out]


class VQAutoEncoder(nn.Module):
    """VQGAN autoencoder. Images ``(B, 3, img_size, img_size)`` in [-1, 1].

    Args:
        img_size: input side S (must be divisible by ``2**(len(ch_mult)-1)``).
        nf: base channels. ch_mult: channel multiplier per level (one level per resolution).
        res_blocks: ResBlocks per level. attn_resolutions: resolutions whose levels get attention.
        codebook_size, emb_dim, beta, l2_normalize: see :class:`VectorQuantizer` (``l2_normalize``:
            cosine codes, an option beyond the published model; off by default).
        norm_groups: GroupNorm groups (32 published; smaller for tiny models).
        checkpoint_activations: activation checkpointing in the encoder and generator (training
            memory for compute; see :class:`Encoder`). Not part of the saved architecture config.
    The published model: ``VQAutoEncoder()`` (512 px, nf 64, ch_mult (1,2,2,4,4,8), latent 16x16x256).
    """

    def __init__(
        self,
        img_size: int = 512,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        codebook_size: int = 1024,
        emb_dim: int = 256,
        beta: float = 0.25,
        norm_groups: int = 32,
        l2_normalize: bool = False,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        down = 2 ** (len(ch_mult) - 1)
        if img_size % down:
            raise ValueError(f"img_size {img_size} must be divisible by 2**(len(ch_mult)-1) = {down}")
        self.config = dict(
            img_size=img_size, nf=nf, ch_mult=list(ch_mult), res_blocks=res_blocks,
            attn_resolutions=list(attn_resolutions), codebook_size=codebook_size, emb_dim=emb_dim,
            beta=beta, norm_groups=norm_groups,
        )
        if l2_normalize:  # only when set, so published-layout configs stay exactly as they were
            self.config["l2_normalize"] = True
        self.img_size = img_size
        self.latent_size = img_size // down
        arch = (img_size, nf, ch_mult, res_blocks, attn_resolutions, emb_dim, norm_groups)
        self.encoder = Encoder(*arch, checkpoint_activations=checkpoint_activations)
        self.quantize = VectorQuantizer(codebook_size, emb_dim, beta, l2_normalize)
        self.generator = Generator(*arch, checkpoint_activations=checkpoint_activations)

    @property
    def checkpoint_activations(self) -> bool:
        """Activation checkpointing in the encoder and generator (settable; training only)."""
        return self.encoder.checkpoint_activations and self.generator.checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        self.encoder.checkpoint_activations = self.generator.checkpoint_activations = bool(enabled)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"this model takes {self.img_size}x{self.img_size} images, got {x.shape[-2]}x{x.shape[-1]}"
            )

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Image ``(B,3,S,S)`` in [-1,1] -> quantized latent and codes (see :class:`QuantizerOutput`)."""
        self._check_input(x)
        z, _ = self.encoder(x)
        return self.quantize(z)

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized latent ``(B, emb_dim, s, s)`` -> image ``(B, 3, S, S)``."""
        return self.generator(zq)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, s*s)`` -> image ``(B, 3, S, S)``."""
        return self.decode(self.quantize.lookup(indices, (self.latent_size, self.latent_size)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction ``(B,3,S,S)`` (unclamped) and the quantizer output."""
        q = self.encode(x)
        return self.decode(q.quantized), q

"""CodeFormer: LQ encoder + Transformer code predictor + codebook + generator + CFT fusion."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from . import fused
from .autoencoder import VQAutoEncoder
from .blocks import ResBlock
from .transformer import TransformerLayer

#: The published inference defaults (``inference_codeformer.py``): fidelity weight 0.5, AdaIN on.
#: ``CodeFormer.restore`` and ``CodeFormer.forward`` share them.
DEFAULT_W = 0.5
DEFAULT_ADAIN = True

#: a fidelity weight: one number for the batch, or one per image (list, tuple, array or tensor)
Fidelity = float | Sequence[float] | torch.Tensor


def fidelity_weight(w: Fidelity, batch_size: int) -> float | torch.Tensor:
    """A fidelity weight in the form the network takes: a Python float (one ``w`` for the batch) or a
    ``(batch_size,)`` float tensor (one per image).

    Accepts a number, a list / tuple / NumPy array of 1 or ``batch_size`` numbers, or a tensor (scalar,
    ``(1,)`` or ``(B,)``). Python and NumPy values are checked: finite and >= 0 (raises ValueError
    naming the problem). Tensors keep their graph and are only checked for shape, so an exported
    model takes ``w`` as an input. Values above 1 extrapolate beyond the input's features: allowed
    (the published stage III trains at 1.3; the published inference accepts them too), see
    :func:`warn_above_one`.
    """
    if isinstance(w, torch.Tensor):
        if w.ndim > 1 or (w.ndim == 1 and w.shape[0] not in (1, batch_size)):
            raise ValueError(
                f"w must be one value or one per image: a scalar or shape ({batch_size},) tensor, got shape "
                f"{tuple(w.shape)}"
            )
        return w
    try:
        values = torch.as_tensor(w, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"w must be a number or a sequence of numbers, got {w!r}") from None
    if values.ndim > 1:
        raise ValueError(
            f"w must be one value or a flat sequence of values, got an array of shape {tuple(values.shape)}"
        )
    if values.numel() not in (1, batch_size):
        raise ValueError(
            f"w has {values.numel()} value(s) {values.flatten().tolist()} for a batch of {batch_size} image(s): give "
            "one value for the batch or one per image"
        )
    listed = values.flatten().tolist()
    bad = [v for v in listed if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"fidelity weight w must be finite and >= 0 (0 = quality, 1 = fidelity), got {bad}")
    return listed[0] if len(listed) == 1 else values.float()


def warn_above_one(w: float | torch.Tensor) -> None:
    """Warn when an inference ``w`` (as :func:`fidelity_weight` returns it) exceeds 1 (allowed, as in the published inference: the fusion is
    extrapolated beyond the input's features, which can bring artefacts)."""
    if isinstance(w, torch.Tensor) and (torch.jit.is_tracing() or torch.jit.is_scripting()):
        return  # an exported graph: w is an input, its values are not known here
    values = w.detach().flatten().tolist() if isinstance(w, torch.Tensor) else [w]
    above = [f"{v:g}" for v in values if v > 1]
    if above:
        warnings.warn(
            f"fidelity weight w={', '.join(above)} > 1 extrapolates the fusion beyond the input's features (the published "
            "training reaches 1.3); expect artefacts. w in [0, 1]: 0 = quality, 1 = fidelity",
            UserWarning,
            stacklevel=3,
        )


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``content`` ``(B,C,H,W)`` the per-channel mean/std of ``style`` ``(B,C,H',W')``.

    std = sqrt(unbiased variance + eps), as published.
    """

    def mean_std(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2, unbiased=True) + eps).sqrt()[..., None, None]

    c_mean, c_std = mean_std(content)
    s_mean, s_std = mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


class FusionBlock(nn.Module):
    """Controllable Feature Transformation at one resolution.

    ``encode_enc`` merges [encoder, decoder] features (ResBlock 2C -> C); ``scale`` and ``shift``
    (conv, LeakyReLU, conv) predict an affine modulation; ``out = dec + w * (dec * scale + shift)``.
    """

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels, norm_groups)

        def modulation() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.LeakyReLU(0.2, True),
                nn.Conv2d(channels, channels, 3, padding=1),
            )

        self.scale = modulation()
        self.shift = modulation()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
        """``enc``, ``dec`` ``(B, C, r, r)``; ``w`` a float or ``(B, 1, 1, 1)`` tensor."""
        if fused.fast_cpu_inference(dec):
            return self._fused_forward(fused.channels_last(enc), fused.channels_last(dec), w)
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))

    def _fused_forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        slope = self.scale[1].negative_slope
        # dec * scale and (dec * scale) + shift as post-ops of the second convolutions
        dec_scale = fused.conv(self.scale[2], fused.conv(self.scale[0], h, leaky_relu=slope), mul=dec)
        modulation = fused.conv(self.shift[2], fused.conv(self.shift[0], h, leaky_relu=slope), add=dec_scale)
        if isinstance(w, torch.Tensor):
            return torch.addcmul(dec, modulation, w)
        return torch.add(dec, modulation, alpha=w)


@dataclass
class CodeFormerOutput:
    """Everything a restoration pass computes.

    image: ``(B, 3, S, S)``, unclamped (nominally [-1, 1]).
    logits: ``(B, s*s, codebook_size)`` code logits per latent position (row-major).
    lq_feat: ``(B, emb_dim, s, s)`` the LQ encoder's latent.
    indices: ``(B, s*s)`` the top-1 codes that were decoded.
    """

    image: torch.Tensor
    logits: torch.Tensor
    lq_feat: torch.Tensor
    indices: torch.Tensor


class CodeFormer(VQAutoEncoder):
    """Blind face restoration network. Images ``(B, 3, img_size, img_size)`` in [-1, 1].

    Holds the whole :class:`VQAutoEncoder` (its encoder becomes the LQ encoder) plus a learned
    position embedding, ``feat_proj`` (emb_dim -> dim_embd), ``n_layers`` Transformer layers, a code
    head (LayerNorm + Linear -> codebook logits) and one :class:`FusionBlock` per fusion resolution.
    ``CodeFormer()`` is the published restoration model; colorization uses
    ``fusion_resolutions=(32, 64, 128)``, inpainting additionally ``codebook_size=512``.

    Call ``model(x, w=0.5, adain=True)`` for the restored image clamped to [-1, 1]; ``restore`` for
    all intermediate results; ``predict_codes`` for the code-only path of stage II training.
    ``checkpoint_activations``: activation checkpointing in the encoder and generator (including the
    fusion blocks) during training; see :class:`~codeformer_lightning.nn.autoencoder.Encoder`.
    On CPU without autograd the blocks run a fused oneDNN path (:mod:`codeformer_lightning.nn.fused`).
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
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        dim_mlp: int | None = None,
        fusion_resolutions: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.0,
        l2_normalize: bool = False,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__(
            img_size, nf, ch_mult, res_blocks, attn_resolutions, codebook_size, emb_dim, beta, norm_groups, l2_normalize,
            checkpoint_activations=checkpoint_activations,
        )
        dim_mlp = 2 * dim_embd if dim_mlp is None else dim_mlp
        self.config.update(
            dim_embd=dim_embd, n_head=n_head, n_layers=n_layers, dim_mlp=dim_mlp,
            fusion_resolutions=sorted(int(r) for r in fusion_resolutions), dropout=dropout,
        )
        channels = {res: nf * mult for res, mult in zip(self.encoder.resolutions, ch_mult)}
        unknown = sorted(set(fusion_resolutions) - set(channels))
        if unknown:
            raise ValueError(f"fusion resolutions {unknown} are not among the model's {sorted(channels)}")
        self.position_emb = nn.Parameter(torch.zeros(self.latent_size**2, dim_embd))
        self.feat_proj = nn.Linear(emb_dim, dim_embd)
        self.transformer = nn.ModuleList(
            [TransformerLayer(dim_embd, n_head, dim_mlp, dropout) for _ in range(n_layers)]
        )
        self.code_head = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        self.fusion = nn.ModuleDict(
            {str(r): FusionBlock(channels[r], norm_groups) for r in sorted(self.config["fusion_resolutions"])}
        )

    @property
    def fusion_resolutions(self) -> list[int]:
        return self.config["fusion_resolutions"]

    def _encode_lq(self, x: torch.Tensor, feature_resolutions: Sequence[int] = ()):
        self._check_input(x)
        lq_feat, feats = self.encoder(x, feature_resolutions)
        tokens = self.feat_proj(rearrange(lq_feat, "b d h w -> b (h w) d"))
        for layer in self.transformer:
            tokens = layer(tokens, self.position_emb)
        return self.code_head(tokens), lq_feat, feats

    def predict_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code-only path (stage II): logits ``(B, s*s, K)`` and the LQ latent ``(B, emb_dim, s, s)``."""
        logits, lq_feat, _ = self._encode_lq(x)
        return logits, lq_feat

    def restore(
        self,
        x: torch.Tensor,
        w: Fidelity = DEFAULT_W,
        adain: bool = DEFAULT_ADAIN,
        detach_codebook: bool = True,
    ) -> CodeFormerOutput:
        """Restore ``x`` ``(B,3,S,S)`` in [-1,1] with fidelity weight ``w``; the defaults are the
        published inference's (``w=0.5``, ``adain=True``), as for :meth:`forward`.

        ``w``: one number for the batch (0 skips the fusion entirely) or one per image (list, tuple,
        array or tensor, see :func:`fidelity_weight`; a tensor always runs the fusion: export-friendly).
        0 = quality, 1 = fidelity; values above 1 extrapolate (training schedules reach 1.3; no warning
        here, :meth:`forward` warns). ``adain``: match the looked-up codebook features' channel
        statistics to the LQ latent's (published inference for restoration and colorization).
        Encoder features enter the fusion detached, as published.
        """
        fuse_res: Sequence[int] = self.fusion_resolutions
        w = fidelity_weight(w, x.shape[0])
        if isinstance(w, torch.Tensor):
            w = w.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)
        elif w == 0.0:
            fuse_res = ()
        logits, lq_feat, enc_feats = self._encode_lq(x, fuse_res)
        indices = logits.argmax(dim=-1)
        quant = self.quantize.lookup(indices, (self.latent_size, self.latent_size))
        if detach_codebook:
            quant = quant.detach()
        if adain:
            quant = adaptive_instance_norm(quant, lq_feat)

        def fuse(res: int, dec: torch.Tensor) -> torch.Tensor:
            if res not in enc_feats:
                return dec
            return self.fusion[str(res)](enc_feats[res].detach(), dec, w)

        image = self.generator(quant, fuse if fuse_res else None)
        return CodeFormerOutput(image, logits, lq_feat, indices)

    def forward(self, x: torch.Tensor, w: Fidelity = DEFAULT_W, adain: bool = DEFAULT_ADAIN) -> torch.Tensor:
        """Restored images ``(B, 3, S, S)`` clamped to [-1, 1] (the published inference call; ``w`` and
        ``adain`` as in :meth:`restore`, with a warning for ``w > 1``)."""
        w = fidelity_weight(w, x.shape[0])
        warn_above_one(w)
        return self.restore(x, w, adain).image.clamp(-1.0, 1.0)

"""The degradation model on a batch of tensors on the training device (optional GPU path).

``degrade_batch(x, cfg, generator)`` takes ``(B, 3, H, W)`` in [-1, 1] and returns the degraded
batch of the same shape, drawing per-sample parameters from the same ranges as the numpy path
(:mod:`.degradations`) but from a ``torch.Generator``: the two paths are statistically alike,
not bit-identical.

* blur: per-sample 41x41 isotropic / anisotropic Gaussian kernels applied by FFT on the
  reflect-101-padded image (one batched ``rfft2``; motion blur is not supported here);
* downsample: ``F.interpolate(bilinear, align_corners=False)`` per sample (the factor differs per
  sample), the same sampling grid as ``cv2.resize(INTER_LINEAR)``; noise on the small image;
* JPEG: an **approximation** of baseline JPEG (no entropy coding, which is lossless anyway):
  RGB -> YCbCr (JFIF), 4:2:0 chroma by 2x2 averaging, 8x8 DCT, quantisation with the standard
  (Annex K) tables scaled for the quality as libjpeg does, inverse DCT, bilinear chroma
  upsampling, rounding to 8-bit levels. Artefacts (blocking, ringing, chroma bleeding) and their
  dependence on quality match libjpeg closely; pixel values differ slightly (libjpeg's integer
  DCT, its "fancy" upsampling);
* bilinear resize back, then colour shift, grayscale and the torchvision-style jitter per sample
  (the published order; downsampled size ``floor(H / r)`` and JPEG quality ``int(q)`` as
  published), rounded to 8-bit levels once at the end.

Faces of another size than the config's ``reference_size`` get its lengths scaled by the rule of
:mod:`.degradations` (sigma and kernel taps times ``size / reference_size``; the small image keeps
the published pixels per face, reached by a bicubic upsample and left by area averaging when it is
larger than the face), so both paths degrade a 32 px face alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .color import JITTER_OPS
from .degradations import DegradationConfig, preset, reference_extent, scaled_kernel_size, size_scale

_LUMA_Q = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64) * (hi - lo) + lo


def gaussian_kernels(
    sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, size: int
) -> torch.Tensor:
    """``(B, size, size)`` float32 kernels (rows y, columns x), each summing to 1."""
    r = torch.arange(size, device=sigma_x.device, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2))
    return (k / k.sum((1, 2), keepdim=True)).float()


def fft_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate each sample ``(B, C, H, W)`` with its kernel ``(B, K, K)`` (reflect-101 border)."""
    b, c, h, w = x.shape
    radius = kernels.shape[-1] // 2
    xp = F.pad(x, (radius, radius, radius, radius), mode="reflect")  # torch "reflect" = cv2 REFLECT_101
    hp, wp = xp.shape[-2:]
    kp = torch.zeros(b, hp, wp, device=x.device, dtype=x.dtype)
    kp[:, : kernels.shape[-2], : kernels.shape[-1]] = kernels.flip(
        -1, -2
    )  # convolution with the flipped kernel
    kp = torch.roll(kp, shifts=(-radius, -radius), dims=(-2, -1))
    out = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(kp)[:, None], s=(hp, wp))
    return out[..., radius : radius + h, radius : radius + w]


def _dct_matrix(device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float().to(device)


def _quant_table(base: torch.Tensor, quality: int) -> torch.Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((base * scale + 50) / 100), 1, 255)


def _dct_quantize(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` level-shifted plane (h, w multiples of 8) -> after 8x8 DCT quantisation and back."""
    h, w = plane.shape
    blocks = plane.reshape(h // 8, 8, w // 8, 8).permute(0, 2, 1, 3)
    coef = dct @ blocks @ dct.T
    coef = torch.round(coef / table) * table
    return (dct.T @ coef @ dct).permute(0, 2, 1, 3).reshape(h, w)


def jpeg_approx(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Approximate JPEG round trip of ``(3, h, w)`` RGB in [0, 255] (see the module docstring)."""
    _, h, w = image.shape
    dct = _dct_matrix(image.device)
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16
    x = F.pad(image[None], (0, wp - w, 0, hp - h), mode="replicate")[0]
    r, g, b = x
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    luma_q = _quant_table(_LUMA_Q.to(image.device), quality)
    chroma_q = _quant_table(_CHROMA_Q.to(image.device), quality)
    y = _dct_quantize(y - 128, luma_q, dct) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr])[None], 2)[0]
    chroma = torch.stack([_dct_quantize(p - 128, chroma_q, dct) + 128 for p in chroma])
    cb, cr = F.interpolate(chroma[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    b = y + 1.772 * (cb - 128)
    return torch.stack([r, g, b])[:, :h, :w].round().clamp(0, 255)


@torch.no_grad()
def degrade_batch(
    x: torch.Tensor, cfg: DegradationConfig | str, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Degrade ``(B, 3, H, W)`` in [-1, 1] on its device; all draws from ``generator`` (on ``x``'s
    device).

    Returns a tuple ``(lq, params)``: ``lq`` ``(B, 3, H, W)`` in [-1, 1] (8-bit levels), ``params``
    a dict of per-sample ``(B,)`` tensors ``sigma_x, sigma_y, theta`` (with blur), ``scale,
    noise_sigma, jpeg_quality, gray, jitter`` and ``color_shift (B, 3)`` (zero where not drawn).
    """
    cfg = preset(cfg)
    if cfg.motion_blur_prob > 0:
        raise NotImplementedError(
            "motion blur is only in the numpy path (codeformer_lightning.data.degradations)"
        )
    img = (x.float() + 1) * 127.5  # grey levels
    params: dict[str, torch.Tensor] = {}
    scale = size_scale(cfg, tuple(x.shape[-2:]))
    if cfg.blur:
        img = _blur(img, cfg, generator, params, scale)
    lq = _resample_noise_jpeg(img, cfg, generator, params)
    lq = _change_colors(lq, cfg, generator, params)
    return (lq.round() / 127.5 - 1).clamp(-1, 1).to(x.dtype), params


def _blur(
    img: torch.Tensor, cfg: DegradationConfig, gen: torch.Generator, params: dict, scale: float = 1.0
) -> torch.Tensor:
    """Per-sample isotropic / anisotropic Gaussian blur (the published kernel mix); ``params`` get
    the drawn sigmas (reference pixels), the kernels are ``scale`` times them (image pixels)."""
    b = img.shape[0]
    lo, hi = cfg.blur_sigma
    aniso = torch.rand(b, generator=gen, device=gen.device) < cfg.anisotropic_prob
    sx, sy = _uniform(b, lo, hi, gen), _uniform(b, lo, hi, gen)
    theta = _uniform(b, -math.pi, math.pi, gen)
    sy = torch.where(aniso, sy, sx)
    theta = torch.where(aniso, theta, torch.zeros_like(theta))
    params.update(sigma_x=sx, sigma_y=sy, theta=theta)
    taps = cfg.kernel_size if scale == 1.0 else scaled_kernel_size(cfg.kernel_size, scale)
    return fft_blur(img, gaussian_kernels(sx * scale, sy * scale, theta, taps).to(img.device))


def _resample_noise_jpeg(
    img: torch.Tensor, cfg: DegradationConfig, gen: torch.Generator, params: dict
) -> torch.Tensor:
    """Downsample to ``floor(H / r)`` (``H`` in reference pixels), add noise, JPEG at ``int(q)``,
    resize back (per sample)."""
    b, _, h, w = img.shape
    scaled = size_scale(cfg, (h, w)) != 1.0
    ref_h, ref_w = reference_extent(cfg, (h, w)) if scaled else (h, w)
    ones = torch.ones(b, dtype=torch.float64, device=gen.device)
    scale = _uniform(b, *cfg.downsample_range, gen) if cfg.downsample else ones
    noise = _uniform(b, *cfg.noise_range, gen) if cfg.noise else 0 * ones
    # the published quality: int() of a uniform draw in the range
    quality = _uniform(b, *cfg.jpeg_range, gen).floor().long() if cfg.jpeg else (0 * ones).long()
    params.update(scale=scale, noise_sigma=noise, jpeg_quality=quality)
    out = []
    for i in range(b):
        r = float(scale[i])
        if cfg.downsample:
            size = (max(1, int(ref_h // r)), max(1, int(ref_w // r)))
        elif scaled and (cfg.noise or cfg.jpeg):  # noise and JPEG at the reference density
            size = (max(1, round(ref_h)), max(1, round(ref_w)))
        else:
            size = (h, w)
        finer = size[0] * size[1] > h * w  # the small image is larger than this face
        low = img[i : i + 1]
        if finer:
            low = F.interpolate(low, size=size, mode="bicubic", align_corners=False)
        elif size != (h, w):
            low = F.interpolate(low, size=size, mode="bilinear", align_corners=False, antialias=False)
        if noise[i] > 0:
            low = low + torch.randn(low.shape, generator=gen, device=gen.device).to(low.device) * float(
                noise[i]
            )
        low = low.clamp(0, 255)
        if cfg.jpeg:
            low = jpeg_approx(low[0].round(), int(quality[i]))[None]
        if finer:  # its pixel-area view at this size
            low = F.interpolate(low, size=(h, w), mode="area")
        elif size != (h, w):
            low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        out.append(low)
    return torch.cat(out)


def _change_colors(
    lq: torch.Tensor, cfg: DegradationConfig, gen: torch.Generator, params: dict
) -> torch.Tensor:
    """Colour shift, grayscale and the torchvision-style jitter (published order), per sample."""
    b = lq.shape[0]
    jitter = torch.rand(b, generator=gen, device=gen.device) < cfg.color_jitter_prob
    shift = (
        torch.rand(b, 3, generator=gen, device=gen.device, dtype=torch.float64) * 2 - 1
    ) * cfg.color_jitter_shift
    shift = torch.where(jitter[:, None], shift, torch.zeros_like(shift))
    lq = (lq + shift.to(lq)[:, :, None, None]).clamp(0, 255)
    gray = torch.rand(b, generator=gen, device=gen.device) < cfg.gray_prob
    luma = (0.299 * lq[:, 0] + 0.587 * lq[:, 1] + 0.114 * lq[:, 2])[:, None].expand(-1, 3, -1, -1)
    lq = torch.where(gray.to(lq.device)[:, None, None, None], luma, lq)
    pt = torch.rand(b, generator=gen, device=gen.device) < cfg.color_jitter_pt_prob
    params.update(color_shift=shift, gray=gray, jitter=pt)
    if not bool(pt.any()):
        return lq
    out = []
    for i in range(b):
        image = lq[i]
        if pt[i]:
            order = torch.randperm(len(JITTER_OPS), generator=gen, device=gen.device).tolist()
            factors = {name: float(_uniform(1, *getattr(cfg, name), gen)) for name in JITTER_OPS}
            image = color_jitter(image, order, factors)
        out.append(image)
    return torch.stack(out)


# ----------------------------------------------------------------------------- colour jitter
_TORCHVISION_LUMA = (0.2989, 0.587, 0.114)


def _luma(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image
    return (_TORCHVISION_LUMA[0] * r + _TORCHVISION_LUMA[1] * g + _TORCHVISION_LUMA[2] * b)[None]


def _rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """Hexcone RGB -> HSV, hue + ``turns`` (mod 1), back; ``(3, H, W)`` in grey levels."""
    r, g, b = image
    value, _ = image.max(0)
    chroma = value - image.min(0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sat = torch.where(
        value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value)
    )
    hue = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue / 6.0 + turns, 1.0) * 6.0
    sector = torch.floor(hue)
    frac = hue - sector
    p, q, t = value * (1 - sat), value * (1 - sat * frac), value * (1 - sat * (1 - frac))
    sector = sector.long() % 6
    table = torch.stack(
        [
            torch.stack([value, q, p, p, t, value]),
            torch.stack([t, value, value, q, p, p]),
            torch.stack([p, p, t, value, value, q]),
        ]
    )  # (3 channels, 6 sectors, H, W)
    return table.gather(1, sector[None, None].expand(3, 1, *sector.shape))[:, 0]


def color_jitter(image: torch.Tensor, order, factors: dict[str, float]) -> torch.Tensor:
    """torchvision-style brightness / contrast / saturation / hue of ``(3, H, W)`` grey levels,
    in ``order`` (indices into :data:`JITTER_OPS`); see :func:`.color.color_jitter`."""
    for index in order:
        name, f = JITTER_OPS[int(index)], factors[JITTER_OPS[int(index)]]
        if name == "brightness":
            image = (image * f).clamp(0, 255)
        elif name == "contrast":
            image = (f * image + (1 - f) * _luma(image).mean()).clamp(0, 255)
        elif name == "saturation":
            image = (f * image + (1 - f) * _luma(image)).clamp(0, 255)
        else:
            image = _rotate_hue(image, f)
    return image

"""Synthetic degradations of clean faces: y = JPEG_q((x * k_sigma) downsampled by r + n_delta), resized back.

The steps, their order and their parameter draws follow the published dataset code
(``FFHQBlindDataset`` / ``FFHQBlindJointDataset``; :data:`PRESETS` hold the published option
values, see ``docs/recipe.md``): 41x41 isotropic / anisotropic Gaussian blur, bilinear resize to
``floor(H / r)``, Gaussian noise, JPEG at quality ``int(q)``, bilinear resize back, then optional
colour changes of the input (:mod:`.color`). ``tests/data/test_preset_distributions.py`` compares
the resulting pairs with a plain re-implementation of the published steps.

Faces of other sizes (``DegradationConfig.reference_size``): the presets' ranges are in pixels of
the 512 px faces they were published for. On an ``S`` px face every quantity that is a length on
the face scales by ``s = S / 512``, so the face loses the same detail relative to its size as a
512 px face does (the rule, measured against degrading at 512 px and resizing, in
``tests/data/test_resolution_scaling.py`` and the README):

* blur: sigma (and a motion-blur length) times ``s``; the kernel keeps the taps within the
  published radius measured in 512 px units, ``2 * floor(20 s) + 1`` taps (41 at 512, 5 at 64);
* downsample: the small image keeps the published number of pixels per face, ``floor(512 / r)``
  (``r`` drawn from the published range): the factor on the ``S`` px face is ``r * s``. Keeping
  ``r`` itself instead would leave ``S / r`` px (2 px of a 64 px face at ``r = 30``, where the
  published pipeline keeps 17): PSNR ~7 dB below the 512 px reference at 64 px;
* noise and JPEG act on that small image as published: noise sigma is per pixel of it and JPEG's
  8x8 blocks cover the same share of the face. Where ``floor(512 / r)`` exceeds ``S`` (a mild
  downsample of a large face, finer than the small face itself) the face is upsampled (bicubic) to
  that size for the noise and the JPEG and reduced back with pixel-area averaging (what the 512 px
  result looks like at ``S`` px). Noise and JPEG on the ``S`` px face itself would put 8x8 blocks
  of a quarter of a 32 px face on it (stage III small at 32 px: 28.5 dB instead of 31.8 dB);
* grey-level quantities (noise sigma in grey levels, JPEG quality, colour changes) do not change.

At ``S = reference_size`` nothing changes: the published pipeline, bit for bit.

All functions work on ``(H, W, 3) uint8 RGB`` numpy images and draw every random choice from a
``numpy.random.Generator`` passed in, so a dataset that derives the generator from (seed, epoch,
index) gets reproducible pairs.

Speed: the 41x41 kernel is first cropped to its support (the dropped taps move no pixel by more
than 0.025 grey levels: a sigma=0.1 kernel is 1x1, sigma=1 about 9x9). Blur followed by a bilinear
downsample is one linear map per axis: per axis a small matrix ``(n_out, n_in)`` (the bilinear taps
of ``cv2.resize(INTER_LINEAR)`` composed with the 1-D blur taps and the reflect-101 border of
``cv2.filter2D``), so blur + downsample of the whole image is ``A @ X @ C``: BLAS products over
the band of each chunk of output rows, which only evaluate the blurred image where the downsample
reads it. An isotropic Gaussian is exactly separable (rank 1); an anisotropic one is a sum of
rank-1 terms from its SVD (exactly even or odd taps), truncated where the dropped terms change no
pixel by more than 0.025 grey levels (a bound). Each draw then takes the route with the lowest
estimated cost: the banded matrices (small outputs, few terms), full-resolution ``sepFilter2D``
passes (few terms, little downsampling), a direct ``filter2D`` (a few taps) or a whole-image
``cv2.dft`` correlation (thin rotated kernels: rank up to ~35). Everything after the downsample
works on the small image; noise comes from OpenCV's generator seeded by ``rng``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import color
from .color import JITTER_OPS

#: the published kernel size (41 x 41)
KERNEL_SIZE = 41
#: the face size (px) the published degradation ranges were defined for
PUBLISHED_SIZE = 512
#: dropped SVD terms of an anisotropic kernel may change a pixel (0..255 scale) by at most this
#: (a worst-case bound; the result is rounded to whole grey levels afterwards)
SVD_TOLERANCE = 0.05


@dataclass(frozen=True)
class DegradationConfig:
    """Ranges and switches of the degradation model; ``sample_params`` draws one instance.

    Ranges are ``(low, high)``, sampled uniformly. ``noise_range`` is the std of Gaussian noise in
    grey levels (``sigma/255`` on a [0,1] image). ``downsample_range`` is the factor ``r`` (1 = no
    downsample; the small image is ``floor(H / r)`` px, as published). ``jpeg_range``: the quality
    is ``int(q)`` for ``q`` uniform in the range, as published (so the high end itself is never
    drawn unless ``low == high``).

    ``reference_size``: the face size (px) the lengths above were defined for (the presets: 512,
    the published faces). An image of another size gets them scaled by ``size / reference_size``
    (see the module docstring); ``None``: they are in pixels of whatever image is degraded.

    Colour changes of the degraded input (the published colorization options; off in the stage II
    and III presets), in the published order: a per-channel shift of up to ``color_jitter_shift``
    grey levels (``color_jitter_prob``), grayscale (``gray_prob``), then with
    ``color_jitter_pt_prob`` torchvision-style ``brightness`` / ``contrast`` / ``saturation``
    factors and a ``hue`` rotation (in turns), each drawn from its range, applied in a random order.
    """

    blur: bool = True
    kernel_size: int = KERNEL_SIZE
    blur_sigma: tuple[float, float] = (1.0, 15.0)
    anisotropic_prob: float = 0.5
    motion_blur_prob: float = 0.0
    motion_length: tuple[int, int] = (5, 25)
    downsample: bool = True
    downsample_range: tuple[float, float] = (4.0, 30.0)
    noise: bool = True
    noise_range: tuple[float, float] = (0.0, 20.0)
    jpeg: bool = True
    jpeg_range: tuple[int, int] = (30, 80)
    color_jitter_prob: float = 0.0
    color_jitter_shift: float = 20.0
    gray_prob: float = 0.0
    color_jitter_pt_prob: float = 0.0
    brightness: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.0, 1.5)
    hue: tuple[float, float] = (-0.1, 0.1)
    reference_size: int | None = None

    def __post_init__(self) -> None:
        if self.kernel_size % 2 != 1 or self.kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.reference_size is not None and self.reference_size < 1:
            raise ValueError(
                f"reference_size must be a positive face size in px (or None), got {self.reference_size}"
            )
        for name in (
            "blur_sigma", "motion_length", "downsample_range", "noise_range", "jpeg_range",
            "brightness", "contrast", "saturation", "hue",
        ):  # fmt: skip
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}=({lo}, {hi}): low end above high end")
        if self.blur and self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
        if self.downsample and self.downsample_range[0] < 1:
            raise ValueError(
                f"downsample_range must be >= 1 (a factor to shrink by), got {self.downsample_range}"
            )
        if self.jpeg and not (1 <= self.jpeg_range[0] <= self.jpeg_range[1] <= 100):
            raise ValueError(f"jpeg_range must lie in [1, 100], got {self.jpeg_range}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name)[0] < 0:
                raise ValueError(f"{name} factors must be >= 0, got {getattr(self, name)}")
        if not -0.5 <= self.hue[0] <= self.hue[1] <= 0.5:
            raise ValueError(f"hue must lie in [-0.5, 0.5] (turns), got {self.hue}")
        for name in (
            "anisotropic_prob",
            "motion_blur_prob",
            "color_jitter_prob",
            "gray_prob",
            "color_jitter_pt_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    @property
    def is_identity(self) -> bool:
        """True when the degradation leaves every image unchanged (preset ``none``)."""
        return not (self.blur or self.downsample or self.noise or self.jpeg) and not (
            self.color_jitter_prob or self.gray_prob or self.color_jitter_pt_prob
        )

    def replace(self, **changes) -> DegradationConfig:
        return dataclasses.replace(self, **changes)


# The published data options (CodeFormer's options/*.yml and FFHQBlind(Joint)Dataset), see
# docs/recipe.md: stage II and the large stage III degradations ...
_STAGE2 = DegradationConfig(
    blur_sigma=(1.0, 15.0),
    downsample_range=(4.0, 30.0),
    noise_range=(0.0, 20.0),
    jpeg_range=(30, 80),
    reference_size=PUBLISHED_SIZE,
)
# ... the small stage III degradations ...
_STAGE3_SMALL = _STAGE2.replace(
    blur_sigma=(0.1, 10.0), downsample_range=(1.0, 12.0), noise_range=(0.0, 15.0), jpeg_range=(60, 100)
)
# ... and colorization: the stage II ranges plus the colour changes of the input (the
# torchvision-style factor ranges are the dataset code's defaults, which the option file keeps).
_COLORIZATION = _STAGE2.replace(
    color_jitter_prob=0.3, color_jitter_shift=20.0, gray_prob=0.01, color_jitter_pt_prob=0.3
)
# Beyond the published stage II / III options: a colour shift (p 0.3, +-20) and grayscale (p 0.01)
# on top of the ranges, what this library's stage presets did before they followed the options.
_EXTRA_JITTER = {"color_jitter_prob": 0.3, "color_jitter_shift": 20.0, "gray_prob": 0.01}
_NONE = DegradationConfig(
    blur=False, downsample=False, noise=False, jpeg=False, reference_size=PUBLISHED_SIZE
)

#: Named degradations: the published ones (``none`` for stage I and inpainting, ``stage2``,
#: ``stage3_small``, ``stage3_large``, ``colorization``) and the ``*_jitter`` extras.
PRESETS: dict[str, DegradationConfig] = {
    "none": _NONE,
    "stage2": _STAGE2,
    "stage3_small": _STAGE3_SMALL,
    "stage3_large": _STAGE2,
    "colorization": _COLORIZATION,
    "stage2_jitter": _STAGE2.replace(**_EXTRA_JITTER),
    "stage3_small_jitter": _STAGE3_SMALL.replace(**_EXTRA_JITTER),
    "stage3_large_jitter": _STAGE2.replace(**_EXTRA_JITTER),
}


def preset(name: str | DegradationConfig) -> DegradationConfig:
    """The named preset (see :data:`PRESETS`); a :class:`DegradationConfig` passes through."""
    if isinstance(name, DegradationConfig):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown degradation preset {name!r}; valid presets: {', '.join(PRESETS)}"
        ) from None


@dataclass
class DegradationParams:
    """One draw of the degradation model (``None`` / 0 where a step is off).

    The drawn values (``sigma_x``, ``sigma_y``, ``motion_length``, ``scale`` = the factor r,
    ``noise_sigma``, ``jpeg_quality``, ...) are in the config's units (pixels of a
    ``reference_size`` face); what is applied to the image is in its own pixels: ``kernel``
    ``(K, K)`` float64 summing to 1 (lengths times ``size_scale``), ``out_size`` ``(h, w)`` of the
    small image the noise and JPEG act on (the effective factor is ``H / h``; larger than the image
    when ``size_scale < 1`` and ``r`` is small, see the module docstring).
    """

    kernel_kind: str | None = None  # "iso", "aniso" or "motion"
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    motion_length: int = 0
    kernel: np.ndarray | None = field(default=None, repr=False)
    scale: float = 1.0
    out_size: tuple[int, int] | None = None
    noise_sigma: float = 0.0
    jpeg_quality: int | None = None
    color_shift: np.ndarray | None = None
    gray: bool = False
    jitter_order: tuple[int, ...] | None = None  # indices into color.JITTER_OPS
    jitter_factors: dict[str, float] | None = None
    size_scale: float = 1.0  # image px per reference px (1: no scaling)

    @property
    def changes_colors(self) -> bool:
        return self.color_shift is not None or self.gray or self.jitter_order is not None


# ----------------------------------------------------------------------------- kernels
def gaussian_kernel_1d(sigma: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """``(size,)`` float64 Gaussian taps summing to 1."""
    x = np.arange(size) - size // 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def gaussian_kernel_2d(sigma_x: float, sigma_y: float, theta: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """``(size, size)`` float64 bivariate Gaussian with std ``sigma_x`` along the axis at angle ``theta``
    (radians, from the image x axis) and ``sigma_y`` across it; sums to 1.

    Rows are y (downwards), columns x.
    """
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinate along the rotated x axis
    v = -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def motion_kernel(length: float, angle: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """``(size, size)`` float64 line of ``length`` px (to a quarter pixel; at least 1) through the
    centre at ``angle`` radians; sums to 1."""
    length = max(1.0, min(float(length), size))
    k = np.zeros((size, size), np.float32)
    c = size // 2
    half = (length - 1) / 2
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    # anti-aliased line drawn at 4x sub-pixel precision (cv2 shift=2)
    p0 = (round((c - dx) * 4), round((c - dy) * 4))
    p1 = (round((c + dx) * 4), round((c + dy) * 4))
    cv2.line(k, p0, p1, 1.0, 1, cv2.LINE_AA, shift=2)
    if k.sum() <= 0:
        k[c, c] = 1.0
    k = k.astype(np.float64)
    return k / k.sum()


def size_scale(cfg: DegradationConfig, size: tuple[int, int]) -> float:
    """Image pixels per pixel of ``cfg``'s ranges for an image of ``size = (H, W)``:
    ``max(H, W) / cfg.reference_size`` (1 without a reference size)."""
    return 1.0 if cfg.reference_size is None else max(size) / cfg.reference_size


def scaled_kernel_size(kernel_size: int, scale: float) -> int:
    """Odd kernel size on an image ``scale`` times the reference: the taps within the reference
    kernel's radius, in reference pixels (``2 * floor(radius * scale) + 1``; 41 -> 5 at 1/8)."""
    return 2 * math.floor((kernel_size // 2) * scale + 1e-9) + 1


def reference_extent(cfg: DegradationConfig, size: tuple[int, int]) -> tuple[float, float]:
    """``size = (H, W)`` in pixels of ``cfg``'s ranges (``(H, W)`` without a reference size; a square
    image measures ``reference_size`` exactly)."""
    if cfg.reference_size is None:
        return float(size[0]), float(size[1])
    side = max(size)
    return size[0] * cfg.reference_size / side, size[1] * cfg.reference_size / side


def sample_params(
    cfg: DegradationConfig, rng: np.random.Generator, size: tuple[int, int]
) -> DegradationParams:
    """Draw one degradation for an image of ``size = (H, W)``; the order of draws is fixed (the
    published order: kernel, factor, noise, JPEG quality, colour shift, grayscale, jitter), and does
    not depend on ``size`` (a 64 px and a 512 px image get the same draws, scaled)."""
    p = DegradationParams(size_scale=size_scale(cfg, size))
    # the published resize target is int(512 // r): floor of the small size, here in the image's
    # pixels when it is the reference size, else of the reference size (the same pixels per face)
    h, w = size if p.size_scale == 1.0 else reference_extent(cfg, size)
    if cfg.blur:
        _sample_kernel(cfg, rng, p)
    if cfg.downsample:
        p.scale = float(rng.uniform(*cfg.downsample_range))
        p.out_size = (max(1, int(h // p.scale)), max(1, int(w // p.scale)))
    elif p.size_scale != 1.0 and (cfg.noise or cfg.jpeg):
        p.out_size = (max(1, round(h)), max(1, round(w)))  # noise and JPEG at the reference density
    if cfg.noise:
        p.noise_sigma = float(rng.uniform(*cfg.noise_range))
    if cfg.jpeg:
        p.jpeg_quality = int(rng.uniform(*cfg.jpeg_range))  # published: int() of a uniform draw
    if cfg.color_jitter_prob and rng.random() < cfg.color_jitter_prob:
        p.color_shift = rng.uniform(-cfg.color_jitter_shift, cfg.color_jitter_shift, size=3)
    if cfg.gray_prob and rng.random() < cfg.gray_prob:
        p.gray = True
    if cfg.color_jitter_pt_prob and rng.random() < cfg.color_jitter_pt_prob:
        p.jitter_order = tuple(int(i) for i in rng.permutation(len(JITTER_OPS)))
        p.jitter_factors = {name: float(rng.uniform(*getattr(cfg, name))) for name in JITTER_OPS}
    return p


def _sample_kernel(cfg: DegradationConfig, rng: np.random.Generator, p: DegradationParams) -> None:
    """Draw the blur kernel into ``p``: motion (extra, off by default), anisotropic or isotropic;
    the kernel's lengths are scaled by ``p.size_scale``."""
    lo, hi = cfg.blur_sigma
    s = p.size_scale
    size = cfg.kernel_size if s == 1.0 else scaled_kernel_size(cfg.kernel_size, s)
    if cfg.motion_blur_prob and rng.random() < cfg.motion_blur_prob:
        p.kernel_kind = "motion"
        p.motion_length = int(rng.integers(cfg.motion_length[0], cfg.motion_length[1] + 1))
        p.theta = float(rng.uniform(-math.pi, math.pi))
        p.kernel = motion_kernel(p.motion_length * s, p.theta, size)
    elif rng.random() < cfg.anisotropic_prob:
        p.kernel_kind = "aniso"
        p.sigma_x, p.sigma_y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        p.theta = float(rng.uniform(-math.pi, math.pi))
        p.kernel = gaussian_kernel_2d(p.sigma_x * s, p.sigma_y * s, p.theta, size)
    else:
        p.kernel_kind = "iso"
        p.sigma_x = p.sigma_y = float(rng.uniform(lo, hi))
        g = gaussian_kernel_1d(p.sigma_x * s, size)
        p.kernel = np.outer(g, g)


# ----------------------------------------------------------------------------- blur + downsample
def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices outside [0, n) mirrored like ``cv2.BORDER_REFLECT_101`` (any distance, any n >= 1)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(n_out, 2)`` and weights ``(n_out, 2)`` of ``cv2.resize(INTER_LINEAR)``.

    Half-pixel centres, no antialiasing, edges clamped (the published pipeline's resize).
    """
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    frac = np.where(i0 < 0, 0.0, frac)
    i0 = np.clip(i0, 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return np.stack([i0, i1], 1), np.stack([1 - frac, frac], 1), src


def resample_matrix(taps: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32: 1-D correlation with ``taps`` (reflect-101 border), then bilinear
    resampling to ``n_out`` (identity when ``n_out == n_in``)."""
    radius = len(taps) // 2
    if n_out == n_in:
        src = np.arange(n_out)[:, None]
        wts = np.ones((n_out, 1))
    else:
        src, wts, _ = _bilinear_taps(n_in, n_out)
    offsets = np.arange(len(taps)) - radius
    cols = _reflect101(src[:, :, None] + offsets[None, None, :], n_in)  # (n_out, 2, K)
    vals = wts[:, :, None] * taps[None, None, :]
    rows = np.broadcast_to(np.arange(n_out)[:, None, None], cols.shape)
    flat = np.bincount((rows * n_in + cols).ravel(), weights=vals.ravel(), minlength=n_out * n_in)
    return flat.reshape(n_out, n_in).astype(np.float32)


def crop_kernel(kernel: np.ndarray, tol: float = SVD_TOLERANCE) -> np.ndarray:
    """The smallest centred odd window of ``kernel`` outside which the taps can change no pixel of a
    0..255 image by more than ``tol`` (small sigmas need far less than 41x41: faster, lower rank)."""
    size = kernel.shape[0]
    c = size // 2
    total = np.abs(kernel).sum()
    for radius in range(c + 1):
        inside = np.abs(kernel[c - radius : c + radius + 1, c - radius : c + radius + 1]).sum()
        if 255.0 * (total - inside) <= tol:
            return kernel[c - radius : c + radius + 1, c - radius : c + radius + 1]
    return kernel


def separable_terms(
    kernel: np.ndarray, tol: float = SVD_TOLERANCE, max_terms: int = 16
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """``[(vertical taps, horizontal taps), ...]`` with ``sum_k outer(v_k, h_k) ~= kernel``.

    Terms are kept until the dropped ones can change no pixel of a 0..255 image by more than ``tol``
    (bound: ``255 * sum s_k |u_k|_1 |v_k|_1``); ``None`` when that needs more than ``max_terms``.
    """
    rank1 = _exact_outer(kernel)
    if rank1 is not None:  # isotropic Gaussians, axis-aligned ones: no SVD needed
        return [rank1]
    if kernel.shape[0] == kernel.shape[1] and np.allclose(kernel, kernel[::-1, ::-1], rtol=0, atol=1e-12):
        # a point-symmetric kernel maps even vectors to even ones and odd to odd: decomposing the two
        # blocks separately gives exactly (anti)symmetric taps, which OpenCV filters ~6x faster, even
        # where singular values (nearly) coincide and a plain SVD would mix even and odd vectors
        u, s, vt = _parity_svd(kernel)
    else:
        u, s, vt = np.linalg.svd(kernel)
    bound = 255.0 * s * np.abs(u).sum(0) * np.abs(vt).sum(1)
    tail = np.cumsum(bound[::-1])[::-1]  # tail[k] = bound of dropping terms k, k+1, ...
    keep = int(np.argmax(np.append(tail, 0.0) <= tol))
    if keep > max_terms:
        return None
    return [(u[:, k] * math.sqrt(s[k]), vt[k] * math.sqrt(s[k])) for k in range(max(keep, 1))]


def _exact_outer(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(v, h)`` with ``outer(v, h) == kernel`` to float64 rounding, or ``None`` if no such pair exists."""
    cy, cx = kernel.shape[0] // 2, kernel.shape[1] // 2
    centre = kernel[cy, cx]
    if centre <= 0:
        return None
    v, h = kernel[:, cx], kernel[cy, :] / centre
    if np.abs(np.outer(v, h) - kernel).max() > 1e-12 * np.abs(kernel).max():
        return None
    return v.copy(), h.copy()


def _parity_bases(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases ``(size, size//2 + 1)`` of even and ``(size, size//2)`` of odd vectors
    (``v[c + i] = +-v[c - i]`` around the centre ``c``) of odd length ``size``."""
    c = size // 2
    even = np.zeros((size, c + 1))
    odd = np.zeros((size, c))
    even[c, 0] = 1.0
    for i in range(1, c + 1):
        even[c + i, i] = even[c - i, i] = math.sqrt(0.5)
        odd[c + i, i - 1], odd[c - i, i - 1] = math.sqrt(0.5), -math.sqrt(0.5)
    return even, odd


def _parity_svd(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD ``(u, s, vt)`` of a point-symmetric odd-sized kernel, every singular vector exactly even or odd."""
    us, ss, vts = [], [], []
    for basis in _parity_bases(kernel.shape[0]):
        if basis.shape[1] == 0:
            continue
        u, s, vt = np.linalg.svd(basis.T @ kernel @ basis)
        us.append(basis @ u)
        ss.append(s)
        vts.append(vt @ basis.T)
    s = np.concatenate(ss)
    order = np.argsort(-s, kind="stable")
    return np.concatenate(us, 1)[:, order], s[order], np.concatenate(vts, 0)[order]


def _band_chunks(mats: np.ndarray, rows_per_chunk: int) -> list[tuple[slice, int, int]]:
    """Split the output rows of ``mats (k, n_out, n_in)`` into chunks with the input columns they read."""
    nonzero = np.any(mats != 0, axis=0)  # (n_out, n_in)
    first = np.argmax(nonzero, axis=1)
    last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    chunks = []
    for start in range(0, nonzero.shape[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, nonzero.shape[0])
        chunks.append((slice(start, stop), int(first[start:stop].min()), int(last[start:stop].max())))
    return chunks


def _banded_matmul(mats: np.ndarray, data: np.ndarray, sum_terms: bool) -> np.ndarray:
    """``mats (k, n_out, n_in) @ data (k or 1, n_in, F)`` touching only each row chunk's band of inputs.

    The matrices are banded (41 taps, 2 bilinear taps): a dense product would spend >90% of its
    multiply-adds on zeros. Chunks of rows share one contiguous input span, so each chunk is one
    BLAS call. Returns ``(n_out, F)`` summed over terms, or ``(k, n_out, F)``.
    """
    k, n_out, n_in = mats.shape
    ratio = n_in / n_out
    chunks = _band_chunks(mats, max(1, int(64 // ratio)))
    out = np.empty((n_out, data.shape[2]) if sum_terms else (k, n_out, data.shape[2]), np.float32)
    for rows, lo, hi in chunks:
        part = np.matmul(mats[:, rows, lo:hi], data[:, lo:hi])
        if sum_terms:
            out[rows] = part.sum(0) if k > 1 else part[0]
        else:
            out[:, rows] = part
    return out


def _blur_downsample_matrices(image: np.ndarray, terms, out_size: tuple[int, int]) -> np.ndarray:
    """``sum_k A_k X C_k^T`` on the float32 image: blur with the separable terms and resample."""
    h_in, w_in = image.shape[:2]
    h_out, w_out = out_size
    k = len(terms)
    a = np.stack([resample_matrix(v, h_in, h_out) for v, _ in terms])  # (k, h, H)
    c = np.stack([resample_matrix(hz, w_in, w_out) for _, hz in terms])  # (k, w, W)
    x = image.reshape(1, h_in, w_in * 3).astype(np.float32)
    rows = _banded_matmul(a, x, sum_terms=False)  # (k, h, W*3): only the rows the output needs
    # columns to the front so the horizontal pass is again a left product
    cols = np.ascontiguousarray(rows.reshape(k, h_out, w_in, 3).transpose(0, 2, 1, 3)).reshape(
        k, w_in, h_out * 3
    )
    out = _banded_matmul(c, cols, sum_terms=True)  # (w, h*3)
    return out.reshape(w_out, h_out, 3).transpose(1, 0, 2)


def _matrix_cost(n_terms: int, size: tuple[int, int], out_size: tuple[int, int], taps: int) -> float:
    """Multiply-adds of the banded matrix path (a band of ~``taps + 64`` inputs per chunk of rows)."""
    (h_in, w_in), (h_out, w_out) = size, out_size
    band_v = min(h_in, taps + 64)
    band_h = min(w_in, taps + 64)
    return n_terms * (h_out * band_v * w_in * 3 + w_out * band_h * h_out * 3)


# Route costs in nanoseconds, measured at 512 px on one thread (x86-64, OpenCV 4/5, OpenBLAS,
# scipy's pocketfft; see benchmarks/bench_degradations.py --profile). Only their ratios matter: each
# route's time grows with the work it does, so the cheapest route stays the cheapest on other machines
# up to a constant factor near the crossovers, where the routes take about as long anyway.
#: banded matrix path: per multiply-add of ``_matrix_cost`` and per extra separable term (the
#: intermediate of every term is written, transposed and read again), plus building the matrices
_NS_PER_MATRIX_MAC = 0.065
_NS_MATRIX_TERM_OVERHEAD = 0.02  # per term and per input value (H * W * 3)
_NS_MATRIX_FIXED = 4.0e5
#: one full-resolution ``sepFilter2D`` pass (8U -> 32F, (anti)symmetric taps): per value and per tap
_NS_SEPARABLE_VALUE, _NS_SEPARABLE_TAP = 0.3, 0.1
#: direct (spatial) float32 ``filter2D``: per value and per tap; only used below OpenCV's DFT switch
_NS_DIRECT_VALUE, _NS_DIRECT_TAP = 0.6, 0.045
#: FFT correlation: per value of the padded transform (``3 * n * m``)
_NS_FFT_VALUE = 5.0
#: ``cv2.resize`` of the full-resolution float32 result: per input value
_NS_RESIZE_VALUE = 0.3
#: OpenCV's ``filter2D`` switches to its (slower) DFT for float32 kernels of at least this many taps
_DIRECT_MAX_TAPS = 129


def _fft_shape(size: tuple[int, int], taps: int) -> tuple[int, int]:
    """Transform size of the FFT route: the image plus the kernel's reflected border, no wrap-around."""
    return tuple(cv2.getOptimalDFTSize(n + taps - 1) for n in size)


def _route_costs(size: tuple[int, int], out_size: tuple[int, int], taps: int, terms) -> dict[str, float]:
    """Estimated nanoseconds of each route able to apply a ``taps x taps`` kernel (with ``terms``
    separable terms, or ``None``) to an ``(H, W, 3)`` image and resample to ``out_size``."""
    values = size[0] * size[1] * 3
    resize = 0.0 if out_size == size else _NS_RESIZE_VALUE * values
    costs = {}
    if terms is not None:
        n = len(terms)
        costs["matrix"] = (
            _NS_MATRIX_FIXED
            + _NS_PER_MATRIX_MAC * _matrix_cost(n, size, out_size, taps)
            + _NS_MATRIX_TERM_OVERHEAD * (n - 1) * values
        )
        costs["separable"] = n * values * (_NS_SEPARABLE_VALUE + _NS_SEPARABLE_TAP * taps) + resize
    if taps * taps <= _DIRECT_MAX_TAPS:
        costs["direct"] = values * (_NS_DIRECT_VALUE + _NS_DIRECT_TAP * taps * taps) + resize
    fft_h, fft_w = _fft_shape(size, taps)
    costs["fft"] = _NS_FFT_VALUE * 3 * fft_h * fft_w + resize
    return costs


def _separable_full_res(image: np.ndarray, terms) -> np.ndarray:
    """``sum_k`` of ``sepFilter2D`` passes on the uint8 image: ``(H, W, 3) float32`` grey levels.

    Float32 output, not a scaled int16 one: int16 is ~1.5x faster for 41 taps (the same below ~21),
    but rounds every pixel to ~1/125 grey level, which zeroes the tails of an impulse response and
    biases its mass and second moments by ~0.1%.
    """
    out = None
    for v, hz in terms:
        part = cv2.sepFilter2D(
            image, cv2.CV_32F, hz.astype(np.float32), v.astype(np.float32), borderType=cv2.BORDER_REFLECT_101
        )
        if out is None:
            out = part
        else:
            out += part
    return out


def fft_correlate(image: np.ndarray, kernel: np.ndarray) -> list[np.ndarray]:
    """Correlate ``(H, W, 3) uint8`` with ``(K, K)`` ``kernel`` (odd ``K``, reflect-101 border) by FFT:
    three ``(H, W) float32`` planes of grey levels (views into the transforms' outputs).

    What ``cv2.filter2D`` computes, ~2.5x faster than its own DFT route at 512 px with a 41x41
    kernel: one whole-image real transform per channel (``cv2.dft``, no tiling), the kernel's
    transform shared; float32 rounding ~1e-4 grey levels.
    """
    h, w = image.shape[:2]
    taps = kernel.shape[0]
    radius = taps // 2
    fft_h, fft_w = _fft_shape((h, w), taps)
    padded = cv2.copyMakeBorder(image, radius, radius, radius, radius, cv2.BORDER_REFLECT_101)
    # zeros up to the transform size: the outputs 0 .. H-1 read padded rows 0 .. H+K-2 only, so
    # nothing wraps around
    padded = cv2.copyMakeBorder(
        padded, 0, fft_h - padded.shape[0], 0, fft_w - padded.shape[1], cv2.BORDER_CONSTANT, value=0
    )
    kernel_plane = np.zeros((fft_h, fft_w), np.float32)
    kernel_plane[:taps, :taps] = kernel
    kernel_spectrum = cv2.dft(kernel_plane)
    planes = []
    for channel in cv2.split(padded):
        # correlation = product with the conjugate spectrum of the kernel (cv2.crossCorr does the same)
        spectrum = cv2.mulSpectrums(cv2.dft(channel.astype(np.float32)), kernel_spectrum, 0, conjB=True)
        planes.append(cv2.idft(spectrum, flags=cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT)[:h, :w])
    return planes


def _fft_blur_resize(image: np.ndarray, kernel: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """FFT route: blur, then ``cv2.resize`` to ``out_size`` plane by plane. ``(h, w, 3) float32``."""
    planes = fft_correlate(image, kernel)
    if tuple(out_size) != image.shape[:2]:
        planes = [cv2.resize(p, out_size[::-1], interpolation=cv2.INTER_LINEAR) for p in planes]
    return cv2.merge(planes)


def blur_and_downsample(
    image: np.ndarray, kernel: np.ndarray | None, out_size: tuple[int, int] | None
) -> np.ndarray:
    """Blur ``(H, W, 3) uint8`` with ``kernel`` (correlation, reflect-101 border) and bilinearly resize
    to ``out_size = (h, w)``. Returns ``(h, w, 3) float32`` in grey levels (not rounded).

    The kernel is first cropped to its support (taps outside change no pixel by more than 0.025
    grey levels), then applied by the route with the lowest estimated cost: banded matrices that
    only evaluate the pixels the downsample reads, a few separable full-resolution passes (low-rank
    kernels), a direct ``filter2D`` (small high-rank kernels) or an FFT (large high-rank kernels).
    All agree with ``cv2.filter2D`` of the full kernel, then ``cv2.resize``, to ~0.05 grey levels.
    """
    size = image.shape[:2]
    out_size = tuple(out_size) if out_size is not None else size
    if kernel is None:
        if out_size == size:
            return image.astype(np.float32)
        return cv2.resize(image.astype(np.float32), out_size[::-1], interpolation=cv2.INTER_LINEAR)
    kernel = crop_kernel(kernel, SVD_TOLERANCE / 2)
    terms = separable_terms(kernel, SVD_TOLERANCE / 2)
    costs = _route_costs(size, out_size, kernel.shape[0], terms)
    return _blur_by_route(image, kernel, terms, out_size, min(costs, key=costs.get))


def _blur_by_route(image: np.ndarray, kernel: np.ndarray, terms, out_size: tuple[int, int], route: str):
    """``blur_and_downsample`` through one named route (``matrix`` and ``separable`` need ``terms``)."""
    if route == "matrix":
        return _blur_downsample_matrices(image, terms, out_size)
    if route == "fft":
        return _fft_blur_resize(image, kernel, out_size)
    if route == "separable":
        blurred = _separable_full_res(image, terms)
    elif route == "direct":
        blurred = cv2.filter2D(
            image.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101
        )
    else:
        raise ValueError(f"unknown blur route {route!r}")
    if out_size == image.shape[:2]:
        return blurred
    return cv2.resize(blurred, out_size[::-1], interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- the pipeline
def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """``(H, W, 3) uint8 RGB`` -> the same after JPEG compression at ``quality`` (OpenCV's encoder)."""
    # cv2 treats channels as BGR: reverse them so the encoder's YCbCr transform sees true colours
    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def gaussian_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``shape`` float32 samples of N(0, sigma^2).

    Drawn by OpenCV's generator (~8x faster than numpy's at 512 px), seeded from ``rng``: as
    reproducible as ``rng`` itself within one thread (each data-loader worker is one).
    """
    cv2.setRNGSeed(int(rng.integers(1, 2**31)))
    # one channel: with a multi-channel array, scalar mean/std would only reach channel 0
    noise = np.empty((shape[0], int(np.prod(shape[1:]))), np.float32)
    cv2.randn(noise, 0.0, float(sigma))
    return noise.reshape(shape)


def apply_degradation(image: np.ndarray, params: DegradationParams, rng: np.random.Generator) -> np.ndarray:
    """Degrade ``(H, W, 3) uint8 RGB`` with drawn ``params``; noise samples come from ``rng``.

    Returns ``(H, W, 3) uint8 RGB`` of the input's size, in the published order: blur, downsample,
    noise, JPEG (of the image rounded to 8 bit), bilinear resize back, then the colour changes
    (shift, grayscale, jitter). Between JPEG and the end the image stays unrounded float, as in the
    published pipeline, and is rounded once. A small image larger than the input (scaled draws, see
    the module docstring) is reached by a bicubic upsample after the blur and left by area averaging.
    """
    h, w = image.shape[:2]
    out = image
    finer = params.out_size is not None and params.out_size[0] * params.out_size[1] > h * w
    if params.kernel is not None or params.out_size is not None or params.noise_sigma > 0:
        if finer:  # a scaled draw whose small image is larger than this face (module docstring)
            low = blur_and_downsample(image, params.kernel, None)
            low = cv2.resize(low, params.out_size[::-1], interpolation=cv2.INTER_CUBIC)
        else:
            low = blur_and_downsample(image, params.kernel, params.out_size)
        if params.noise_sigma > 0:
            low += gaussian_noise(low.shape, params.noise_sigma, rng)
        out = np.clip(low, 0.0, 255.0)
    if params.jpeg_quality is not None:
        out = jpeg_round_trip(_to_uint8(out), params.jpeg_quality)
    if out.shape[:2] != (h, w):
        back = cv2.INTER_AREA if finer else cv2.INTER_LINEAR  # finer: the pixel-area view of it
        out = cv2.resize(np.ascontiguousarray(out, np.float32), (w, h), interpolation=back)
    if params.changes_colors:
        out = _change_colors(out.astype(np.float32), params)
    return _to_uint8(out)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float grey levels rounded and clipped to ``uint8`` (uint8 input passes through)."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _change_colors(image: np.ndarray, params: DegradationParams) -> np.ndarray:
    """The drawn colour changes on ``(H, W, 3) float32`` grey levels, in the published order."""
    if params.color_shift is not None:
        image = color.shift_channels(image, params.color_shift)
    if params.gray:
        image = color.to_gray(image)
    if params.jitter_order is not None:
        image = color.color_jitter(image, params.jitter_order, params.jitter_factors)
    return image


def degrade(
    image: np.ndarray, cfg: DegradationConfig | str, rng: np.random.Generator
) -> tuple[np.ndarray, DegradationParams]:
    """Draw and apply one degradation: ``(H, W, 3) uint8 RGB`` -> ``(lq (H, W, 3) uint8, params)``."""
    cfg = preset(cfg)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"degrade expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    params = sample_params(cfg, rng, image.shape[:2])
    return apply_degradation(image, params, rng), params

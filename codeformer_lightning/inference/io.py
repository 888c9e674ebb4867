"""Robust image reading and writing for the restoration command.

Every reader returns ``(H, W, 3)`` uint8 RGB whatever the file holds: grayscale and palette images
are expanded, 16-bit images are reduced to 8 bits, EXIF orientation is applied, and transparent
images are composited on white (the alpha channel is returned separately by
:func:`read_image_with_alpha` so that PNG outputs can keep it). Anything unreadable raises
:class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})
MAX_PIXELS = 178_000_000  # PIL refuses more (decompression-bomb guard): ~13000 x 13000 px


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Integer or float pixel arrays of any bit depth -> uint8, scaled by the type's range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255):
        return (np.clip(array, 0, 65535).astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(np.rint(array / peak * 255.0), 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _pil_to_arrays(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2), None
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return rgba[..., :3].copy(), rgba[..., 3].copy()
    return np.asarray(img.convert("RGB")).copy(), None


def _read_16bit_color(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """48/64-bit colour PNG/TIFF, which PIL cannot represent: read them with OpenCV."""
    import cv2

    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 3:
        return None
    data = _to_uint8(data)
    rgb = np.ascontiguousarray(data[..., 2::-1])
    alpha = data[..., 3].copy() if data.shape[2] == 4 else None
    return rgb, alpha


def read_image_with_alpha(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``path`` as ``(rgb (H,W,3) uint8, alpha (H,W) uint8 or None)``; raises :class:`ImageReadError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 MP on; big photos are legitimate here, MAX_PIXELS is the limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(path, f"image too large ({img.width}x{img.height} px)")
                img.load()  # decodes now: truncated or corrupt data fails here, not later
                raw_mode = img.mode
                img = ImageOps.exif_transpose(img)
                rgb, alpha = _pil_to_arrays(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"corrupt or truncated image ({err})") from None
    if raw_mode == "RGB" and path.suffix.lower() in (".png", ".tif", ".tiff"):
        wide = _read_16bit_color(path)  # PIL silently drops 16-bit colour to 8 bits badly
        if wide is not None:
            rgb, alpha = wide
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(path, "empty image")
    return rgb, alpha


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as ``(H, W, 3)`` uint8 RGB; transparency is composited on white."""
    rgb, alpha = read_image_with_alpha(path)
    return composite_on_white(rgb, alpha)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Blend ``rgb`` (H,W,3) uint8 over a white background with ``alpha`` (H,W) uint8 (None: as is)."""
    if alpha is None:
        return rgb
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(np.rint(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)


def write_image(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> Path:
    """Write ``rgb`` (H,W,3) uint8; ``alpha`` (H,W) uint8 is kept for PNG/WebP/TIFF, dropped otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if alpha is not None and path.suffix.lower() in (".png", ".webp", ".tif", ".tiff"):
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    else:
        kwargs = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
        Image.fromarray(rgb, "RGB").save(path, **kwargs)
    return path

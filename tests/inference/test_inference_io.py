"""Robust image reading: modes, bit depths, orientation, transparency and broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from codeformer_lightning.inference.io import (
    ImageReadError,
    composite_on_white,
    read_image,
    read_image_with_alpha,
    write_image,
)


def _gradient(height: int = 40, width: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4, y * 6, (x + y) * 2], axis=2).astype(np.uint8)


def test_rgb_png_and_jpeg(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=98)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8 and np.abs(out.astype(int) - rgb).mean() < 3


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = _gradient()[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (40, 60, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    Image.fromarray(_gradient()).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (40, 60, 3)


def test_16_bit_gray_and_colour(tmp_path):
    import cv2

    gray16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[..., 1], (gray16.astype(np.uint32) * 255 // 65535).astype(np.uint8))
    colour16 = np.zeros((10, 12, 3), np.uint16)
    colour16[..., 0] = 65535  # full red in RGB order
    cv2.imwrite(str(tmp_path / "c16.png"), colour16[..., ::-1])  # cv2 writes BGR
    out = read_image(tmp_path / "c16.png")
    assert out.dtype == np.uint8 and (out[..., 0] == 255).all() and (out[..., 1:] == 0).all()


def test_rgba_composited_on_white_and_alpha_kept(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = read_image(tmp_path / "t.png")
    assert (out[:, :15] == [200, 0, 0]).all() and (out[:, 15:] == 255).all()
    rgb, alpha = read_image_with_alpha(tmp_path / "t.png")
    assert (alpha == rgba[..., 3]).all() and (rgb[..., 0] == 200).all()
    write_image(tmp_path / "o.png", out, alpha)
    assert Image.open(tmp_path / "o.png").mode == "RGBA"
    write_image(tmp_path / "o.jpg", out, alpha)  # JPEG has no alpha: dropped silently
    assert Image.open(tmp_path / "o.jpg").mode == "RGB"
    assert (composite_on_white(rgb, None) == rgb).all()


def test_exif_orientation_is_applied(tmp_path):
    rgb = _gradient(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=98)
    assert read_image(tmp_path / "r.jpg").shape == (50, 20, 3)


def test_broken_files_raise_typed_errors_naming_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "full.png")
    png = bytearray((tmp_path / "full.png").read_bytes())
    start = png.index(b"IDAT") + 8
    png[start:start + 40] = bytes(40)  # zeroed compressed data inside a valid container
    (tmp_path / "bad.png").write_bytes(bytes(png))
    for name, reason in [("notes.txt", "not an image"), ("junk.png", "not an image"), ("cut.jpg", "truncated"),
                         ("bad.png", "corrupt"),
                         ("missing.png", "no such file")]:
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        assert name in str(info.value) and info.value.path.name == name

"""The foundation reader/writer: modes, bit depths, orientation, transparency, broken data, video."""

from __future__ import annotations

import io
import pickle
from fractions import Fraction

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from codeformer_lightning import io as cio


def _gradient(height: int = 40, width: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4, y * 6, (x + y) * 2], axis=2).astype(np.uint8)


def _png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def test_rgb_png_is_exact_and_jpeg_close(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(cio.read_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=98)
    out = cio.read_image(tmp_path / "a.jpg")
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8 and np.abs(out.astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_other_colour_modes_become_the_same_rgb_as_pil(mode):
    source = Image.fromarray(_gradient()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    source.save(buffer, format=fmt)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    out = cio.decode_image(buffer.getvalue())
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_16_bit_grey_is_rounded_not_truncated():
    values = np.array([[0, 128, 129, 257 * 100, 257 * 100 + 128, 65535]], np.uint16)
    out = cio.decode_image(_png_bytes(Image.fromarray(values)))
    # independent computation: nearest 8-bit level of v / 65535 (ties cannot occur: 65535 is odd)
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(expected[0], [0, 0, 1, 100, 100, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_16_bit_colour_and_alpha_keep_their_precision(tmp_path):
    rng = np.random.default_rng(0)
    rgba16 = rng.integers(0, 65536, (9, 11, 4), dtype=np.uint16)
    expected = np.floor(rgba16.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgba16[..., [2, 1, 0, 3]])  # OpenCV writes BGRA
    assert cv2.imwrite(str(tmp_path / "c16.tif"), rgba16[..., [2, 1, 0]])
    rgb, alpha = cio.read_image_with_alpha(tmp_path / "c16.png")
    np.testing.assert_array_equal(rgb, expected[..., :3])
    np.testing.assert_array_equal(alpha, expected[..., 3])
    rgb, alpha = cio.read_image_with_alpha(tmp_path / "c16.tif")
    np.testing.assert_array_equal(rgb, expected[..., :3])
    assert alpha is None
    # what PIL alone gives for the same file differs: the reason the 16-bit path exists
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "c16.tif").convert("RGB")), expected[..., :3])


def test_transparency_is_kept_or_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    rgba[:, 15:20, 3] = 64  # a strip that is a quarter opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = cio.read_image(tmp_path / "t.png")
    assert (out[:, :15] == [200, 0, 0]).all() and (out[:, 20:] == 255).all()
    a = 64 / 255
    np.testing.assert_array_equal(
        out[0, 17], np.rint([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    )
    rgb, alpha = cio.read_image_with_alpha(tmp_path / "t.png")
    np.testing.assert_array_equal(alpha, rgba[..., 3])
    assert (rgb[..., 0] == 200).all()
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    rgb, alpha = cio.decode_image_with_alpha(_png_bytes(la))
    np.testing.assert_array_equal(alpha, rgba[..., 3])
    assert cio.read_image_with_alpha(tmp_path / "t.png")[0].flags.writeable


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pils_exif_transpose(tmp_path, orientation):
    rgb = _gradient(20, 50)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "r.png")).convert("RGB"))
    out = cio.read_image(tmp_path / "r.png")
    np.testing.assert_array_equal(out, expected)
    assert out.shape == ((50, 20, 3) if orientation >= 5 else (20, 50, 3))


def test_exif_orientation_applies_to_16_bit_colour_and_alpha(tmp_path):
    rgba = np.zeros((6, 10, 4), np.uint16)
    rgba[0, 0] = (65535, 0, 0, 65535)  # one opaque red pixel at the stored top-left
    Image.fromarray((rgba[..., :3] // 257).astype(np.uint8)).save(tmp_path / "probe.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the top-left pixel ends top-right
    data = bytearray(_png_bytes(Image.new("RGB", (10, 6)), exif=exif))
    cv2.imwrite(str(tmp_path / "c.png"), rgba[..., [2, 1, 0, 3]])
    # splice the eXIf chunk of the 8-bit file into the 16-bit one (after IHDR)
    chunk_at = data.index(b"eXIf") - 4
    chunk_len = int.from_bytes(data[chunk_at : chunk_at + 4], "big") + 12
    wide = bytearray((tmp_path / "c.png").read_bytes())
    wide[33:33] = data[chunk_at : chunk_at + chunk_len]
    rgb, alpha = cio.decode_image_with_alpha(bytes(wide), "c.png")
    assert rgb.shape == (10, 6, 3) and alpha.shape == (10, 6)
    assert tuple(rgb[0, 5]) == (255, 0, 0) and alpha[0, 5] == 255 and alpha.sum() == 255


def test_broken_data_raises_bad_image_error_naming_the_origin(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    png = bytearray(_png_bytes(Image.fromarray(_gradient(64, 64))))
    start = png.index(b"IDAT") + 8
    png[start : start + 40] = bytes(40)  # zeroed compressed data inside a valid container
    (tmp_path / "bad.png").write_bytes(bytes(png))
    cases = [
        ("notes.txt", "not an image"),
        ("cut.jpg", "truncated"),
        ("bad.png", "corrupt"),
        ("missing.png", "no such file"),
    ]
    for name, reason in cases:
        with pytest.raises(cio.BadImageError, match=reason) as info:
            cio.read_image(tmp_path / name)
        assert info.value.origin == str(tmp_path / name) and str(info.value).startswith(str(tmp_path / name))
    with pytest.raises(cio.BadImageError, match=r"^<upload>: not an image"):
        cio.decode_image(b"", "<upload>")
    with pytest.raises(cio.BadImageError, match=r"too large \(60x40 px, limit 1000 px\)"):
        cio.decode_image(_png_bytes(Image.fromarray(_gradient())), max_pixels=1000)
    error = pickle.loads(pickle.dumps(cio.BadImageError("a.png", "corrupt")))  # crosses worker processes
    assert (error.origin, error.reason, str(error)) == ("a.png", "corrupt", "a.png: corrupt")


def test_encode_and_write_round_trip(tmp_path):
    rgb = _gradient()
    alpha = np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))
    for fmt in ("png", "webp", "tiff"):
        back_rgb, back_alpha = cio.decode_image_with_alpha(cio.encode_image(rgb, fmt, 100, alpha))
        np.testing.assert_array_equal(back_alpha, alpha)
        if fmt != "webp":  # lossless formats give back exactly what was written
            np.testing.assert_array_equal(back_rgb, rgb)
    # JPEG has no alpha: it stores what decode_image would show (composited on white)
    jpeg = cio.decode_image_with_alpha(cio.encode_image(rgb, "jpg", 100, alpha))
    assert jpeg[1] is None
    assert np.abs(jpeg[0].astype(int) - cio.composite_on_white(rgb, alpha)).mean() < 2
    path = cio.write_image(tmp_path / "sub" / "o.png", rgb, alpha)
    assert Image.open(path).mode == "RGBA"
    np.testing.assert_array_equal(cio.read_image_with_alpha(path)[1], alpha)
    with pytest.raises(ValueError, match="extension '.xyz'"):
        cio.write_image(tmp_path / "o.xyz", rgb)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        cio.encode_image(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="alpha must be"):
        cio.encode_image(rgb, alpha=alpha[:10])
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        cio.encode_image(rgb, "gif")


def test_extensions_and_listing(tmp_path):
    assert all(e == e.lower() and e.startswith(".") for e in cio.IMAGE_EXTENSIONS | cio.VIDEO_EXTENSIONS)
    assert cio.is_image_path("A/B.JPG") and not cio.is_image_path("clip.mp4") and not cio.is_image_path("x")
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPEG", "sub/c.webp", "notes.txt", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()  # a folder with an image-like name is not a file
    assert [p.name for p in cio.image_files_in(tmp_path)] == ["a.JPEG", "b.png", "c.webp"]
    assert [p.name for p in cio.image_files_in(tmp_path, recursive=False)] == ["a.JPEG", "b.png"]


# ----------------------------------------------------------------------------- video
def _tone_packets_source(path, frames: int, fps: int, width: int, height: int):
    """A clip with textured frames and a 440 Hz AAC tone, written with PyAV directly (not our writer)."""
    import av

    rng = np.random.default_rng(1)
    images = [
        cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (width, height)) for _ in range(frames)
    ]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for image in images:
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
        samples = 16000 * frames // fps
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)[None]
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts, chunk.time_base = 16000, start, Fraction(1, 16000)
            out.mux(audio.encode(chunk))
        out.mux(audio.encode(None))
    return images


def test_video_round_trip_pads_odd_sizes_keeps_rate_and_copies_audio(tmp_path):
    import av

    _tone_packets_source(tmp_path / "in.mp4", frames=5, fps=12, width=34, height=26)
    with cio.VideoReader(tmp_path / "in.mp4") as reader:
        assert (reader.width, reader.height, reader.rate) == (34, 26, Fraction(12))
        # odd frames made by cropping the decoded ones: 33 x 25
        with cio.VideoWriter(
            tmp_path / "out.mp4", reader.rate, (33, 25), crf=0, audio_template=reader.audio_stream
        ) as writer:
            assert writer.size == (34, 26) and writer.audio
            decoded = []
            for frame in reader.frames(on_audio=writer.copy_audio):
                decoded.append(frame)
                writer.write(np.ascontiguousarray(frame[:25, :33]))
    assert len(decoded) == 5 and writer.frames == 5
    with cio.VideoReader(tmp_path / "out.mp4") as out:
        assert (out.width, out.height, out.rate) == (34, 26, Fraction(12))
        frames = list(out.frames())
    assert len(frames) == 5
    for got, sent in zip(frames, decoded):
        sent = sent[:25, :33].astype(int)
        assert np.abs(got[:25, :33].astype(int) - sent).mean() < 3  # crf 0 (yuv420p chroma still subsampled)
        # the padding repeats the last row / column
        assert np.abs(got[25, :33].astype(int) - sent[24]).mean() < 4
        assert np.abs(got[:25, 33].astype(int) - sent[:, 32]).mean() < 4
    with av.open(str(tmp_path / "in.mp4")) as src, av.open(str(tmp_path / "out.mp4")) as dst:
        a_in = [bytes(p) for p in src.demux(src.streams.audio[0]) if p.dts is not None]
        a_out = [bytes(p) for p in dst.demux(dst.streams.audio[0]) if p.dts is not None]
        assert a_out == a_in and len(a_in) > 3  # packets copied unchanged, all of them
    info = cio.video_info(tmp_path / "out.mp4")
    assert info == {"frames": 5, "fps": 12.0, "width": 34, "height": 26, "audio": True}


def test_video_size_from_the_first_frame_holds_audio_until_then(tmp_path):
    _tone_packets_source(tmp_path / "in.mp4", frames=4, fps=8, width=16, height=16)
    with cio.VideoReader(tmp_path / "in.mp4") as reader:
        with cio.VideoWriter(tmp_path / "big.mp4", reader.rate, audio_template=reader.audio_stream) as writer:
            assert writer.size is None
            frames = reader.frames(on_audio=writer.copy_audio)
            for frame in frames:  # e.g. an upscaled restoration: twice the size
                writer.write(cv2.resize(frame, (32, 32)))
    assert cio.video_info(tmp_path / "big.mp4") == {
        "frames": 4,
        "fps": 8.0,
        "width": 32,
        "height": 32,
        "audio": True,
    }


def test_video_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    with pytest.raises(cio.VideoError, match="broken.mp4: cannot be opened"):
        cio.VideoReader(broken)
    with pytest.raises(cio.VideoError, match="missing.mp4: no such video file"):
        cio.VideoReader(tmp_path / "missing.mp4")
    with cio.VideoWriter(tmp_path / "o.mp4", 10, (16, 16)) as writer:
        with pytest.raises(cio.VideoError, match=r"o.mp4: frames must be \(16, 16, 3\) uint8"):
            writer.write(np.zeros((8, 8, 3), np.uint8))
        writer.write(np.zeros((16, 16, 3), np.uint8))
    assert cio.video_info(tmp_path / "o.mp4")["frames"] == 1
    with pytest.raises(cio.VideoError, match="empty.mp4: no frame was written"):
        with cio.VideoWriter(tmp_path / "empty.mp4", 10):
            pass


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_video_display_rotation_is_applied_like_exif(tmp_path, rotation):
    """A phone's portrait video: landscape frames stored with a display matrix. The reader gives the
    frames as a player shows them (sizes swapped for a quarter turn), and the writer's output, which
    has no matrix, shows the same."""
    import av

    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :8] = 255  # a white band along the stored left edge
    with av.open(str(tmp_path / "phone.mp4"), "w") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        video.set_display_rotation(rotation)  # counter-clockwise degrees, as players apply them
        for _ in range(3):
            out.mux(video.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        out.mux(video.encode(None))
    shown = np.rot90(stored, rotation // 90)  # what a player shows
    with cio.VideoReader(tmp_path / "phone.mp4") as reader:
        assert reader.rotation == rotation % 360
        assert (reader.height, reader.width) == shown.shape[:2]
        with cio.VideoWriter(tmp_path / "out.mp4", reader.rate, (reader.width, reader.height), crf=0) as writer:
            for frame in reader.frames():
                assert frame.shape == shown.shape
                assert np.abs(frame.astype(int) - shown).mean() < 4
                writer.write(frame)
    with cio.VideoReader(tmp_path / "out.mp4") as written:
        assert written.rotation == 0 and (written.height, written.width) == shown.shape[:2]
        assert all(np.abs(f.astype(int) - shown).mean() < 4 for f in written.frames())

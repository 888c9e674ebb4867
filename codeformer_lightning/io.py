"""The one place where images and videos are read and written (the foundation floor: imports nothing
of ours).

Images. :func:`decode_image` (bytes) and :func:`read_image` (a file) return ``(H, W, 3) uint8 RGB``
whatever the file holds, and every user of pixels calls them: training datasets, LMDB packing,
latent codes, inference, evaluation, the video path and the server. So the same file gives the same
pixels everywhere. The rules:

* EXIF orientation is applied (a phone photo stored sideways comes out upright);
* grayscale, bilevel, palette, CMYK and YCbCr images become RGB;
* 16-bit images (grey or colour, PNG or TIFF) are scaled to 8 bits by rounding ``v * 255 / 65535``
  (a 16-bit file written from 8-bit data, ``v * 257``, gives back exactly ``v``); 16-bit colour,
  which PIL cannot hold, is decoded by OpenCV;
* transparency is kept by the ``*_with_alpha`` readers (``alpha (H, W) uint8``) and composited on
  white by the plain ones (as a transparent background shows on a page);
* anything that does not decode fully (not an image, corrupt, truncated, empty, larger than
  ``max_pixels``) raises :class:`BadImageError` naming where it came from and why (too large:
  its subclass :class:`ImageTooLargeError`).

Videos. :class:`VideoReader` opens a file once and yields ``(H, W, 3) uint8 RGB`` frames turned
upright by the stream's display rotation (a phone's portrait video, like EXIF for photos), handing
the audio packets of the same pass to a callback; :class:`VideoWriter` writes H.264 (yuv420p) at a
given frame rate and copies audio packets without re-encoding. yuv420p needs even sides: frames of
odd width or height are **padded** to even by repeating their last column / row (no input pixel is
lost; the output is at most one pixel wider and taller).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm"})
#: default decompression-bomb guard: ~13000 x 13000 px (PIL itself refuses from about twice its own
#: 89 MP warning level, which equals this)
MAX_PIXELS = 178_000_000
#: encode_image / write_image formats and whether they hold an alpha channel
_ALPHA_FORMATS = {"png": True, "webp": True, "tiff": True, "jpeg": False, "bmp": False}
_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


class BadImageError(ValueError):
    """Data that cannot be used as an image. ``origin`` names where it came from (a file, a URL,
    ``"<upload>"``), ``reason`` says why; the message is ``"<origin>: <reason>"``."""

    def __init__(self, origin: str | Path, reason: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = str(origin)
        self.reason = reason

    def __reduce__(self):  # survive pickling across data-loader workers (args differ from __init__'s)
        return type(self), (self.origin, self.reason)


class ImageTooLargeError(BadImageError):
    """An image over the ``max_pixels`` guard (or PIL's decompression-bomb limit): readable, but
    refused for its size (a server answers 413 rather than 400)."""


def is_image_path(path: str | Path) -> bool:
    """Whether ``path`` has an image file extension (any case); says nothing about its contents."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_files_in(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The image files (by extension, :data:`IMAGE_EXTENSIONS`) in ``folder``, sorted by path."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if is_image_path(p) and p.is_file())


# ----------------------------------------------------------------------------- decoding
def decode_image_with_alpha(
    data: bytes, origin: str = "<bytes>", max_pixels: int | None = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoded image bytes -> ``(rgb (H, W, 3) uint8, alpha (H, W) uint8 or None)``.

    ``alpha`` is None for images without transparency. See the module docstring for the rules;
    raises :class:`BadImageError` naming ``origin``. ``max_pixels``: refuse larger images
    (None: only PIL's own decompression-bomb limit applies).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 MP on; big photos are legitimate, max_pixels is the limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLargeError(
                        origin, f"image too large ({img.width}x{img.height} px, limit {max_pixels} px)"
                    )
                img.load()  # decodes everything now: truncated or corrupt data fails here, not later
                orientation = _orientation(img)
                rgb, alpha = _decode_16bit(data) if _is_16bit(img, data) else (None, None)
                if rgb is None:
                    rgb, alpha = _pil_arrays(img, origin)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(origin, "not an image file (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(origin, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "broken"
        raise BadImageError(origin, f"corrupt or truncated image ({exc})") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise BadImageError(origin, "empty image (0 px)")
    rgb = _orient(rgb, orientation)
    return rgb, (None if alpha is None else _orient(alpha, orientation))


def decode_image(data: bytes, origin: str = "<bytes>", max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> ``(H, W, 3) uint8 RGB``, transparency composited on white.

    Raises :class:`BadImageError` naming ``origin`` (see :func:`decode_image_with_alpha`).
    """
    return composite_on_white(*decode_image_with_alpha(data, origin, max_pixels))


def read_image_with_alpha(
    path: str | Path, max_pixels: int | None = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the file ``path`` -> ``(rgb (H, W, 3) uint8, alpha (H, W) uint8 or None)``;
    raises :class:`BadImageError` naming the file."""
    return decode_image_with_alpha(_read_bytes(path), str(path), max_pixels)


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read the file ``path`` -> ``(H, W, 3) uint8 RGB`` (transparency composited on white);
    raises :class:`BadImageError` naming the file."""
    return decode_image(_read_bytes(path), str(path), max_pixels)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Blend ``rgb`` (H, W, 3) uint8 over white with ``alpha`` (H, W) uint8; ``alpha`` None: ``rgb``."""
    if alpha is None:
        return rgb
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(np.rint(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)


def _read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadImageError(path, f"cannot read the file ({exc.strerror or exc})") from None


def _is_16bit(img: Image.Image, data: bytes) -> bool:
    """PNG or TIFF with 16 bits per sample (PIL reduces such colour images to 8 bits by truncation)."""
    if img.format == "PNG":
        return len(data) > 24 and data[24] == 16  # IHDR bit depth: 8 signature + 8 chunk head + 8 size
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, (8,))  # BitsPerSample
        return 16 in (bits if isinstance(bits, tuple) else (bits,))
    return False


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 rounded (65535 / 255 = 257 exactly, so ``v * 257`` maps back to ``v``)."""
    return ((np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def _decode_16bit(data: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
    """16-bit PNG/TIFF through OpenCV (which keeps all 16 bits; orientation is applied by the caller).
    ``(None, None)`` when OpenCV cannot read it (PIL's 8-bit reading is then used)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16:
        return None, None
    array = _scale_16_to_8(array)
    if array.ndim == 2 or array.shape[2] == 1:
        return np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2), None
    rgb = np.ascontiguousarray(array[..., 2::-1])  # OpenCV's BGR(A) -> RGB
    return rgb, (array[..., 3].copy() if array.shape[2] == 4 else None)


def _pil_arrays(img: Image.Image, origin: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit grey (I: 32-bit container of 16-bit values)
        return np.repeat(_scale_16_to_8(np.asarray(img))[..., None], 3, axis=2), None
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        return rgba[..., :3].copy(), rgba[..., 3].copy()
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8), None  # L, 1, P, CMYK, YCbCr, ...
    except ValueError:
        raise BadImageError(origin, f"unsupported colour mode {mode}") from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); 1 when the EXIF block is missing or unreadable."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not make the pixels unreadable
        return 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to ``(H, W[, C])`` pixels, as PIL's ``exif_transpose`` does."""
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # transposed
        6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn clockwise
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transversed
        8: lambda a: np.rot90(a, 1),  # stored rotated 90 clockwise: turn counter-clockwise
    }
    op = ops.get(orientation)
    return array if op is None else np.ascontiguousarray(op(array))


# ----------------------------------------------------------------------------- encoding
def encode_image(
    rgb: np.ndarray, fmt: str = "png", quality: int = 95, alpha: np.ndarray | None = None
) -> bytes:
    """``rgb`` (H, W, 3) uint8 -> encoded bytes in ``fmt`` (png, jpeg/jpg, webp, tiff/tif, bmp).

    ``alpha`` (H, W) uint8 is stored by png, webp and tiff; formats without transparency (jpeg,
    bmp) get the image composited on white, which is what :func:`decode_image` would show.
    ``quality`` (1-100) applies to jpeg and webp.
    """
    fmt = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if fmt not in _ALPHA_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {sorted(_ALPHA_FORMATS)}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an image to encode must be (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.dtype != np.uint8 or alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha must be (H, W) = {rgb.shape[:2]} uint8, got {alpha.shape} {alpha.dtype}")
    if alpha is not None and not _ALPHA_FORMATS[fmt]:
        rgb, alpha = composite_on_white(rgb, alpha), None
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if alpha is not None:
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    options = {"quality": int(quality)} if fmt in ("jpeg", "webp") else {}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def write_image(
    path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None, quality: int = 95
) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 to ``path`` in the format its extension names (see
    :func:`encode_image`: alpha kept by png/webp/tiff); makes the parent folder; returns ``path``."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if _FORMAT_ALIASES.get(fmt, fmt) not in _ALPHA_FORMATS:
        raise ValueError(f"{path}: cannot tell the image format from the extension {path.suffix!r}")
    data = encode_image(rgb, fmt, quality, alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- video
class VideoError(RuntimeError):
    """A video could not be read or written; the message names the file."""


def _quarter_turns(degrees: float, path: Path) -> int:
    """A frame's display rotation (degrees counter-clockwise, as PyAV reads the display matrix) as
    0, 90, 180 or 270; other angles are kept as stored, with a warning."""
    if degrees % 90:
        warnings.warn(
            f"{path}: display rotation of {degrees} degrees is not a quarter turn: frames kept as stored",
            stacklevel=4,
        )
        return 0
    return int(degrees) % 360


class VideoReader:
    """One pass over a video file, opened once.

    Attributes: ``width``, ``height`` (px, of the frames as shown), ``rate`` (frames per second, a
    Fraction: the stream's average rate, else its guessed rate, else 25), ``rotation`` (degrees
    counter-clockwise the stored frames are turned by to be shown upright), ``audio_stream`` (the
    first audio stream or None; hand it to :class:`VideoWriter` as ``audio_template``). Use as a
    context manager.

    A phone stores a portrait video as landscape frames plus a display matrix saying how to turn
    them; the frames given here are turned as a player shows them (a multiple of 90 degrees, read
    from the first decoded frame), as EXIF orientation is for photos, and written without a matrix.
    """

    def __init__(self, path: str | Path) -> None:
        import av

        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"{self.path}: no such video file")
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: cannot be opened as a video ({exc})") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self.path}: has no video stream")
        self.video_stream = self._container.streams.video[0]
        audio = self._container.streams.audio
        self.audio_stream = audio[0] if audio else None
        # one demux pass for the whole reader; the display rotation comes with the decoded frames, so
        # the first one is decoded now and kept, with the audio packets met before it, for frames()
        self._packets = self._container.demux([s for s in (self.video_stream, self.audio_stream) if s is not None])
        self._early_audio: list[object] = []
        self._early_frames = self._decode_first_frames()
        self.rotation = _quarter_turns(self._early_frames[0].rotation, self.path) if self._early_frames else 0
        self.width = self.video_stream.codec_context.width
        self.height = self.video_stream.codec_context.height
        if self.rotation % 180:
            self.width, self.height = self.height, self.width
        stream = self.video_stream
        rate = stream.average_rate or stream.guessed_rate
        self.rate = Fraction(rate) if rate else Fraction(25)

    def frames(self, on_audio: Callable[[object], None] | None = None) -> Iterator[np.ndarray]:
        """Decoded frames ``(H, W, 3) uint8 RGB`` in order. With ``on_audio``, the audio packets met
        on the way are passed to it (e.g. :meth:`VideoWriter.copy_audio`) in the same single pass."""
        import av

        early_audio, early_frames = self._early_audio, self._early_frames
        self._early_audio, self._early_frames = [], []
        if on_audio is not None:
            for packet in early_audio:
                on_audio(packet)
        yield from (self._upright(frame) for frame in early_frames)
        try:
            for packet in self._packets:
                if packet.stream is not self.video_stream:
                    if on_audio is not None and packet.dts is not None:  # the final flush packet carries nothing
                        on_audio(packet)
                    continue
                for frame in packet.decode():
                    yield self._upright(frame)
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self.path}: decoding failed ({exc})") from None

    def _decode_first_frames(self) -> list:
        """Demux until video frames decode; return them, keeping the audio packets met on the way."""
        import av

        try:
            for packet in self._packets:
                if packet.stream is not self.video_stream:
                    if packet.dts is not None:
                        self._early_audio.append(packet)
                    continue
                frames = list(packet.decode())
                if frames:
                    return frames
        except av.error.FFmpegError as exc:
            self._container.close()
            raise VideoError(f"{self.path}: decoding failed ({exc})") from None
        return []

    def _upright(self, frame) -> np.ndarray:
        """A decoded frame as ``(H, W, 3) uint8 RGB``, turned as a player shows it."""
        rgb = frame.to_ndarray(format="rgb24")
        return np.ascontiguousarray(np.rot90(rgb, self.rotation // 90)) if self.rotation else rgb

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class VideoWriter:
    """Encode ``(H, W, 3) uint8 RGB`` frames into ``path`` at ``rate`` frames per second.

    Output: ``codec`` (default libx264 at ``crf``) in yuv420p, constant frame rate. ``frame_size``
    ``(width, height)`` of the frames to come; None: taken from the first frame (for frames whose
    size is known only once made, e.g. upscaled ones), after which every frame must have it. Odd
    sides are padded to even by repeating the last column / row (module docstring); ``size`` is
    the output's ``(width, height)`` once known. With ``audio_template`` (e.g.
    :attr:`VideoReader.audio_stream`) an audio stream of the same codec is added and
    :meth:`copy_audio` muxes packets into it unchanged (held back until the first frame when the
    size is not known yet); when the container does not accept that codec, ``audio`` is False and
    ``notes`` says why. Use as a context manager: leaving it flushes the encoder and closes the file.
    """

    def __init__(
        self,
        path: str | Path,
        rate: Fraction | float | int,
        frame_size: tuple[int, int] | None = None,
        codec: str = "libx264",
        crf: int = 18,
        audio_template: object | None = None,
    ) -> None:
        import av

        self.path = Path(path)
        self.rate = Fraction(rate).limit_denominator(1_000_000)
        if self.rate <= 0:
            raise VideoError(f"{self.path}: frame rate must be positive, got {rate}")
        self.codec, self.crf = codec, int(crf)
        self.frame_size: tuple[int, int] | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self.notes: list[str] = []
        self._video = None
        self._held_audio: list[object] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._container = av.open(str(self.path), "w")
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: cannot be created ({exc})") from None
        self._audio = self._add_audio(audio_template) if audio_template is not None else None
        if frame_size is not None:
            self._open_video(*frame_size)

    @property
    def audio(self) -> bool:
        """Whether an audio stream is being copied."""
        return self._audio is not None

    def _add_audio(self, template: object):
        import av

        try:
            return self._container.add_stream_from_template(template)
        except (av.error.FFmpegError, ValueError) as exc:  # e.g. a codec the container does not hold
            self.notes.append(f"audio ({template.codec_context.name}) not copied: {exc}")
            return None

    def _open_video(self, width: int, height: int) -> None:
        import av

        if width < 1 or height < 1:
            raise VideoError(f"{self.path}: frame size must be positive, got {width}x{height}")
        try:
            self._video = self._container.add_stream(self.codec, rate=self.rate)
        except (av.error.FFmpegError, ValueError) as exc:
            raise VideoError(f"{self.path}: cannot encode with {self.codec!r} ({exc})") from None
        self.frame_size = (int(width), int(height))
        self.size = (width + width % 2, height + height % 2)
        self._video.width, self._video.height = self.size
        self._video.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            self._video.options = {"crf": str(self.crf)}

    def write(self, frame: np.ndarray) -> None:
        """Encode one ``(H, W, 3) uint8 RGB`` frame (of ``frame_size``)."""
        import av

        if self._video is None and frame.ndim == 3:
            self._open_video(frame.shape[1], frame.shape[0])
        width, height = self.frame_size or (0, 0)
        if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
            raise VideoError(
                f"{self.path}: frames must be ({height}, {width}, 3) uint8 RGB, got {frame.shape} {frame.dtype}"
            )
        pad = ((0, self.size[1] - height), (0, self.size[0] - width), (0, 0))
        if pad[0][1] or pad[1][1]:
            frame = np.pad(frame, pad, mode="edge")
        try:
            for packet in self._held_audio:
                self._container.mux(packet)
            self._held_audio.clear()
            self._container.mux(self._video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self.path}: encoding failed after {self.frames} frames ({exc})") from None
        self.frames += 1

    def copy_audio(self, packet: object) -> None:
        """Mux an audio packet of the template's stream unchanged (ignored when audio is not copied)."""
        if self._audio is None:
            return
        packet.stream = self._audio
        if self._video is None:  # no stream may be written before all streams exist
            self._held_audio.append(packet)
        else:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and close the file (safe to call twice). Raises VideoError when no
        frame was written (the file would not be a video)."""
        if self._container is None:
            return
        import av

        try:
            if self._video is None:
                raise VideoError(f"{self.path}: no frame was written")
            self._container.mux(self._video.encode(None))
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self.path}: finishing the encoding failed ({exc})") from None
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._container is not None:  # failing: close without flushing into a broken file
            self._container.close()
            self._container = None


def video_info(path: str | Path) -> dict:
    """``{"frames", "fps", "width", "height", "audio"}`` of a video file (frames counted by decoding)."""
    with VideoReader(path) as reader:
        frames = sum(1 for _ in reader.frames())
        return {
            "frames": frames,
            "fps": float(reader.rate),
            "width": reader.width,
            "height": reader.height,
            "audio": reader.audio_stream is not None,
        }

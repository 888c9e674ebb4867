"""The restoration API's request and response formats, validated field by field.

A request is a ``POST`` whose body is either ``multipart/form-data`` (the image as a file part) or
a JSON object (the image base64-encoded, optionally as a ``data:`` URL). Fields:

=================== ================================================ ====================
field               value                                            default
=================== ================================================ ====================
``image``           the photo (any format :mod:`codeformer_lightning.io` reads)  required
``w``               fidelity weight(s) in [0, 1]: a number or a list   the task's published
                    (form: repeat the field or separate by commas)     value
``aligned``         the image is an FFHQ-aligned face (no detection)  false
``upscale``         output scale of whole photos, in (0, ``max_upscale``]  1
``only_center_face`` restore only the face nearest the centre          false
``format``          ``png`` or ``jpeg`` (``jpg``)                      png
``quality``         JPEG quality 1-100                                 95
=================== ================================================ ====================

Form fields arrive as text, so booleans are ``true/false/1/0/yes/no/on/off``. Every problem
raises :class:`RequestError` with an HTTP status and a message that names the field. Nothing here
imports the serving framework: the functions are plain and unit-testable.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from codeformer_lightning.inference.restorer import RestoreResult
from codeformer_lightning.io import (
    BadImageError,
    ImageTooLargeError,
    composite_on_white,
    decode_image_with_alpha,
    encode_image,
)

FIELDS = ("image", "w", "aligned", "upscale", "only_center_face", "format", "quality")
FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg"}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx) and ``detail``, a message naming the problem."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``max_pixels``: input image size (width x height);
    ``max_upscale``: output scale; ``max_fidelities``: ``w`` values per request (each one is a
    network pass per face)."""

    max_pixels: int = 25_000_000
    max_upscale: float = 4.0
    max_fidelities: int = 8


@dataclass
class RestoreRequest:
    """One validated request. ``data``: the encoded image as received; :meth:`decode` turns it into
    ``rgb`` ``(H, W, 3)`` uint8 (the file's colours), ``alpha`` ``(H, W)`` uint8 or None and
    ``image``, what the restorer sees: ``rgb`` composited on white (``rgb`` itself when opaque).
    ``ws`` None: the restorer's default weight."""

    data: bytes
    origin: str
    ws: list[float] | None
    aligned: bool
    upscale: float
    only_center_face: bool
    fmt: str
    quality: int
    image: np.ndarray | None = None
    rgb: np.ndarray | None = None
    alpha: np.ndarray | None = None

    def decode(self, max_pixels: int | None = Limits.max_pixels) -> RestoreRequest:
        """Decode ``data`` into ``rgb``/``alpha``/``image`` (once; the bytes are then dropped) and
        return self; raises :class:`RequestError`: 400 for unreadable or truncated images, 413 for
        images over ``max_pixels``."""
        if self.image is None:
            try:
                self.rgb, self.alpha = decode_image_with_alpha(self.data, self.origin, max_pixels)
            except ImageTooLargeError as exc:
                raise RequestError(413, str(exc)) from None
            except BadImageError as exc:
                raise RequestError(400, str(exc)) from None
            self.image, self.data = composite_on_white(self.rgb, self.alpha), b""
        return self


def _values(payload: object) -> dict[str, list]:
    """The request's fields as ``name -> list of values`` (form fields may repeat, JSON ones don't)."""
    if hasattr(payload, "multi_items"):  # starlette FormData
        fields: dict[str, list] = {}
        for key, value in payload.multi_items():
            fields.setdefault(key, []).append(value)
        return fields
    if isinstance(payload, Mapping):
        return {key: [value] for key, value in payload.items()}
    raise RequestError(400, "the JSON body must be an object with an 'image' field, got "
                            f"a JSON {type(payload).__name__}")


def _single(fields: dict[str, list], name: str):
    values = fields.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise RequestError(400, f"'{name}' is given {len(values)} times; give it once")
    return values[0]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"'{name}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(400, f"'{name}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(400, f"'{name}' must be a finite number, got {value!r}")
    return number


def _flag(name: str, value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestError(400, f"'{name}' must be true or false, got {value!r}")


def _fidelities(fields: dict[str, list], limits: Limits) -> list[float] | None:
    raw = fields.get("w")
    if raw is None:
        return None
    items: list = []
    for value in raw:
        if isinstance(value, list):
            items.extend(value)
        elif isinstance(value, str):
            items.extend(part for part in value.split(",") if part.strip())
        else:
            items.append(value)
    if not items:
        raise RequestError(400, "'w' is empty: give at least one fidelity weight in [0, 1]")
    ws = [_number("w", v) for v in items]
    outside = [v for v in ws if not 0.0 <= v <= 1.0]
    if outside:
        raise RequestError(400, f"'w' must lie in [0, 1], got {outside}")
    ws = list(dict.fromkeys(ws))
    if len(ws) > limits.max_fidelities:
        raise RequestError(400, f"'w' has {len(ws)} values, more than this server's limit of {limits.max_fidelities}")
    return ws


def _image_bytes(value: object) -> tuple[bytes, str]:
    """The encoded image and a name for messages, from a form file part or a base64 string."""
    if value is None:
        raise RequestError(400, "no 'image': send the photo as a multipart file field 'image' or as base64 "
                                "in the JSON field 'image'")
    if hasattr(value, "filename") and hasattr(value, "file"):  # starlette UploadFile
        value.file.seek(0)
        return value.file.read(), f"image {value.filename!r}" if value.filename else "image"
    if not isinstance(value, str):
        raise RequestError(400, f"'image' must be base64 text or a file upload, got a JSON {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, "'image' is a data: URL without ';base64': send base64-encoded bytes")
    try:
        return base64.b64decode(text, validate=True), "image"
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"'image' is not valid base64 ({exc})") from None


def parse_fields(payload: object, limits: Limits = Limits()) -> RestoreRequest:
    """A form or JSON payload -> :class:`RestoreRequest` with every field checked and the image
    still encoded (see :meth:`RestoreRequest.decode`); raises :class:`RequestError`."""
    fields = _values(payload)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; this API takes {list(FIELDS)}")
    fmt = str(_single(fields, "format") or "png").lower()
    if fmt not in FORMATS:
        raise RequestError(400, f"'format' must be png or jpeg, got {fmt!r}")
    quality = _single(fields, "quality")
    quality = 95 if quality is None else _number("quality", quality)
    if quality != int(quality) or not 1 <= quality <= 100:
        raise RequestError(400, f"'quality' must be an integer from 1 to 100, got {quality:g}")
    upscale = _single(fields, "upscale")
    upscale = 1.0 if upscale is None else _number("upscale", upscale)
    if not 0.0 < upscale <= limits.max_upscale:
        raise RequestError(400, f"'upscale' must lie in (0, {limits.max_upscale:g}], got {upscale:g}")
    ws = _fidelities(fields, limits)
    aligned = _flag("aligned", _single(fields, "aligned"))
    only_center_face = _flag("only_center_face", _single(fields, "only_center_face"))
    data, origin = _image_bytes(_single(fields, "image"))
    return RestoreRequest(data, origin, ws, aligned, upscale, only_center_face, FORMATS[fmt], int(quality))


def parse_request(payload: object, limits: Limits = Limits()) -> RestoreRequest:
    """:func:`parse_fields` and :meth:`RestoreRequest.decode` in one step."""
    return parse_fields(payload, limits).decode(limits.max_pixels)


def output_image(result: RestoreResult, w: float, rgb: np.ndarray, alpha: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The picture to hand back for weight ``w`` and the transparency to store with it.

    Whole photos keep the input's ``alpha`` (resized to the output, as ``codeformer-restore``
    does); a restored aligned face is opaque. A photo in which nothing was restored comes back
    as it came in (``rgb``, ``alpha``: not composited on white) when its size is unchanged.
    """
    image = result.images[w]
    if alpha is None or result.aligned:
        return image, None
    if not result.cropped_faces and image.shape == rgb.shape:
        return rgb, alpha
    height, width = image.shape[:2]
    if alpha.shape != (height, width):
        alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
    return image, alpha


def response_body(request: RestoreRequest, result: RestoreResult, batch: dict) -> dict:
    """The JSON answer: encoded images (base64) per ``w``, the task run (``restoration``,
    ``colorization`` or ``inpainting``: the weights' published inference), face count, boxes,
    scores, landmarks (in the input image's pixels), output size, notes and what the batch looked like."""
    images = []
    for w in result.ws:
        image, alpha = output_image(result, w, request.rgb, request.alpha)
        data = encode_image(image, request.fmt, request.quality, alpha)
        images.append({"w": w, "image": base64.b64encode(data).decode("ascii")})
    first = result.images[result.ws[0]]
    if result.aligned:
        height, width = request.image.shape[:2]
        boxes, scores, landmarks = [[0.0, 0.0, float(width), float(height)]], [None], [None]
    else:
        boxes = [[round(float(v), 2) for v in face.box] for face in result.faces]
        scores = [round(float(face.score), 4) for face in result.faces]
        landmarks = [np.round(face.landmarks, 2).tolist() for face in result.faces]
    return {
        "task": result.task,
        "faces": len(result.cropped_faces),
        "boxes": boxes,
        "scores": scores,
        "landmarks": landmarks,
        "width": int(first.shape[1]),
        "height": int(first.shape[0]),
        "format": request.fmt,
        "images": images,
        "notes": list(result.notes),
        "batch": batch,
    }

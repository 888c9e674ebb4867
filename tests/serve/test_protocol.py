"""Request parsing rules and the batching of several requests' faces, without a server."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from starlette.datastructures import FormData

from codeformer_lightning.inference.detection import Face
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import decode_image, decode_image_with_alpha, encode_image
from codeformer_lightning.serve.batching import BatchRestorer, BatchStats, Rejection, Restored
from codeformer_lightning.serve.protocol import (
    Limits,
    RequestError,
    parse_fields,
    parse_request,
    response_body,
)


def _photo(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_image(image, "png")).decode()


def test_json_and_form_give_the_same_request():
    photo = _photo()
    as_json = parse_request({"image": "data:image/png;base64," + _b64(photo), "w": [0.7, 0.2, 0.7],
                             "aligned": True, "upscale": 2, "format": "jpg", "quality": 80})
    as_form = parse_request(FormData([("image", _b64(photo)), ("w", "0.7, 0.2"), ("w", "0.7"), ("aligned", "Yes"),
                                      ("upscale", "2"), ("format", "JPG"), ("quality", "80")]))
    for request in (as_json, as_form):
        np.testing.assert_array_equal(request.image, photo)
        assert request.ws == [0.7, 0.2]  # duplicates dropped, order kept
        assert (request.aligned, request.upscale, request.fmt, request.quality) == (True, 2.0, "jpeg", 80)
    defaults = parse_request({"image": _b64(photo)})
    assert (defaults.ws, defaults.aligned, defaults.upscale, defaults.only_center_face, defaults.fmt) == (
        None, False, 1.0, False, "png")


@pytest.mark.parametrize("fields, message", [
    ({"w": [0.5] * 3 + [0.1, 0.2, 0.3]}, "'w' has 4 values, more than this server's limit of 3"),
    ({"w": []}, "'w' is empty"),
    ({"w": "nan"}, "finite"),
    ({"upscale": 0}, "'upscale' must lie in (0, 4]"),
    ({"quality": 101}, "'quality' must be an integer from 1 to 100"),
    ({"quality": 9.5}, "'quality' must be an integer"),
    ({"only_center_face": "2"}, "'only_center_face' must be true or false"),
    ({"image": "data:image/png,abc"}, "without ';base64'"),
    ({"image": 5}, "'image' must be base64 text or a file upload"),
])
def test_field_errors_name_the_field(fields, message):
    payload = {"image": _b64(_photo()), **fields}
    with pytest.raises(RequestError) as caught:
        parse_request(payload, Limits(max_fidelities=3))
    assert caught.value.status == 400 and message in caught.value.detail


def test_fields_are_checked_before_the_image_is_decoded():
    request = parse_fields({"image": base64.b64encode(b"GIF89a broken").decode(), "w": 0.3})
    assert request.image is None and request.ws == [0.3]  # cheap checks first: decoding runs in parallel later
    with pytest.raises(RequestError, match="corrupt or truncated|not an image") as caught:
        request.decode()
    assert caught.value.status == 400


def test_repeated_single_field_and_pixel_limit():
    with pytest.raises(RequestError, match="'upscale' is given 2 times"):
        parse_request(FormData([("image", _b64(_photo())), ("upscale", "1"), ("upscale", "2")]))
    with pytest.raises(RequestError, match=r"image too large \(128x96 px, limit 10000 px\)") as caught:
        parse_request({"image": _b64(_photo())}, Limits(max_pixels=10_000))
    assert caught.value.status == 413  # readable, but too large: not a malformed request


class _FixedDetector:
    """Faces at fixed centres (a 40 px box with eyes, nose and mouth)."""

    def __init__(self, centres):
        self.centres = centres

    def detect(self, image):
        faces = []
        for cx, cy in self.centres:
            marks = np.array([[cx - 8, cy - 6], [cx + 8, cy - 6], [cx, cy + 2], [cx - 6, cy + 10], [cx + 6, cy + 10]],
                             float)
            faces.append(Face(np.array([cx - 20, cy - 20, cx + 20, cy + 20], float), marks, 0.99))
        return faces


def _request(image, **fields):
    return parse_request({"image": _b64(image), **fields})


def test_faces_of_several_requests_share_network_calls(tiny_serve_model):
    restorer = FaceRestorer(tiny_serve_model, detector=_FixedDetector([(40, 48), (90, 50)]), batch_size=3)
    stats = BatchStats(max_requests=8, max_faces=3)
    batcher = BatchRestorer(restorer, stats)
    photos = [_photo(1), _photo(2), _photo(3)]
    items = [_request(photos[0], w=0.5), _request(photos[1], w=0.5), Rejection(400, "bad"),
             _request(photos[2], w=[0.2, 0.9], upscale=2)]
    outcomes = batcher.restore(items)
    assert isinstance(outcomes[2], Rejection) and outcomes[2].detail == "bad"
    first, second, fourth = outcomes[0], outcomes[1], outcomes[3]
    assert all(isinstance(o, Restored) for o in (first, second, fourth))
    # 4 faces of the two w=0.5 requests pooled 3 + 1; the other w list is its own group: 2 faces x 2 weights
    assert first.batch["network_calls"] == [3, 1] and first.batch["group_requests"] == 2
    assert fourth.batch["network_calls"] == [2, 2] and fourth.batch["group_faces"] == 2
    assert first.batch["requests"] == 4
    # pooled results equal one-by-one restoration (up to batch-size dependent rounding)
    alone = FaceRestorer(tiny_serve_model, detector=restorer.detector).restore(photos[1], w=0.5)
    assert np.abs(alone.image.astype(int) - second.result.image).max() <= 1
    big = FaceRestorer(tiny_serve_model, detector=restorer.detector, upscale=2).restore(photos[2], w=[0.2, 0.9])
    assert fourth.result.images[0.9].shape == (192, 256, 3)
    assert np.abs(big.images[0.9].astype(int) - fourth.result.images[0.9]).max() <= 1
    snapshot = stats.snapshot()
    assert snapshot["requests_per_batch"] == {"4": 1} and snapshot["faces_per_network_call"] == {"1": 1, "2": 2,
                                                                                              "3": 1}
    assert (snapshot["requests"], snapshot["rejected"], snapshot["faces"], snapshot["network_calls"]) == (4, 1, 6, 4)


def test_only_center_face_per_request_and_failing_detection_stays_local(tiny_serve_model):
    class Flaky(_FixedDetector):
        def detect(self, image):
            if image[0, 0, 0] == 7:
                raise RuntimeError("detector exploded")
            return super().detect(image)

    restorer = FaceRestorer(tiny_serve_model, detector=Flaky([(30, 40), (64, 48)]))
    batcher = BatchRestorer(restorer)
    poisoned = _photo(5)
    poisoned[0, 0, 0] = 7
    outcomes = batcher.restore([_request(_photo(4), only_center_face=True), _request(poisoned),
                                _request(_photo(6))])
    assert len(outcomes[0].result.faces) == 1 and len(outcomes[2].result.faces) == 2
    assert isinstance(outcomes[1], Rejection) and outcomes[1].status == 500
    assert "detector exploded" in outcomes[1].detail
    assert restorer.only_center_face is False  # per-request options never change the shared restorer


def test_response_body_keeps_transparency_of_whole_photos(tiny_serve_model):
    rgb = _photo(7, (40, 60))
    alpha = np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))
    request = parse_request({"image": base64.b64encode(encode_image(rgb, "png", alpha=alpha)).decode(), "upscale": 2})
    restorer = FaceRestorer(tiny_serve_model, detector=_FixedDetector([]), upscale=2)
    body = response_body(request, restorer.restore(request.image), {"requests": 1})
    assert body["faces"] == 0 and (body["width"], body["height"]) == (120, 80)
    out_rgb, out_alpha = decode_image_with_alpha(base64.b64decode(body["images"][0]["image"]))
    assert out_alpha.shape == (80, 120) and out_alpha[:, -1].min() > 200 and out_alpha[:, 0].max() < 10
    request.fmt = "jpeg"
    jpeg = response_body(request, restorer.restore(request.image), {})
    assert decode_image(base64.b64decode(jpeg["images"][0]["image"])).shape == (80, 120, 3)

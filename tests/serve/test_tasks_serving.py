"""The server follows the weights' variant: inpainting and colorization weights get their published
inference, the answer names the task, requests the task cannot take get 400; requests that differ
only in per-request options share network calls."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from conftest import start_server
from serve_helpers import tiny_codeformer_config

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.inference.detection import Face
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import decode_image, encode_image
from codeformer_lightning.nn import CodeFormer
from codeformer_lightning.serve.api import RestorationAPI, RestorerSettings
from codeformer_lightning.serve.batching import BatchRestorer, Rejection, Restored
from codeformer_lightning.serve.protocol import Limits, parse_request, response_body

SIZE = 32  # the tiny network's face size


class _OneFace:
    def detect(self, image):
        cx, cy = image.shape[1] / 2, image.shape[0] / 2
        marks = np.array([[cx - 8, cy - 6], [cx + 8, cy - 6], [cx, cy + 2], [cx - 6, cy + 10], [cx + 6, cy + 10]])
        return [Face(np.array([cx - 20, cy - 20, cx + 20, cy + 20]), marks, 0.99)]


@pytest.fixture(scope="module")
def inpainting_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = CodeFormer(**tiny_codeformer_config()).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return save_weights(model, tmp_path_factory.mktemp("inpainting") / "inpainting.safetensors", variant="inpainting")


def _holed_face(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    face = np.random.default_rng(seed).integers(0, 250, (SIZE, SIZE, 3), dtype=np.uint8)
    holes = np.zeros((SIZE, SIZE), bool)
    holes[6:18, 8:24] = True
    face[holes] = 255
    return face, holes


def _request(image: np.ndarray, **fields):
    return parse_request({"image": base64.b64encode(encode_image(image, "png")).decode(), **fields})


def test_inpainting_weights_answer_with_the_published_inference_and_refuse_whole_photos(inpainting_weights):
    restorer = FaceRestorer(inpainting_weights, detector=_OneFace())
    batcher = BatchRestorer(restorer)
    face, holes = _holed_face()
    photo = np.random.default_rng(1).integers(0, 250, (64, 80, 3), dtype=np.uint8)
    items = [_request(face, aligned=True), _request(photo), _request(face, aligned=True, w=0.5)]
    first, refused, override = batcher.restore(items)
    assert isinstance(refused, Rejection) and refused.status == 400 and "aligned faces only" in refused.detail
    assert isinstance(first, Restored) and first.result.ws == [1.0]
    body = response_body(items[0], first.result, first.batch)
    assert body["task"] == "inpainting"
    answer = decode_image(base64.b64decode(body["images"][0]["image"]))
    np.testing.assert_array_equal(answer[~holes], face[~holes])
    assert (answer[holes] != 255).any()  # the holes were filled
    expected = FaceRestorer(inpainting_weights).restore(face, aligned=True).image
    np.testing.assert_array_equal(answer, expected)
    assert override.result.ws == [0.5] and any("w=0.5 instead of the published w=1" in n for n in override.result.notes)


def test_requests_differing_only_in_options_share_network_calls(tiny_serve_model):
    restorer = FaceRestorer(tiny_serve_model, detector=_OneFace(), batch_size=4)
    batcher = BatchRestorer(restorer)
    photo = np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    outcomes = batcher.restore([_request(photo, w=0.5), _request(photo, w=0.5, upscale=2),
                                _request(photo, w=0.5, only_center_face=True)])
    assert all(isinstance(o, Restored) for o in outcomes)
    assert outcomes[0].batch["network_calls"] == [3]  # one call for the three requests' faces
    assert [o.result.image.shape for o in outcomes] == [(64, 80, 3), (128, 160, 3), (64, 80, 3)]
    alone = FaceRestorer(tiny_serve_model, detector=_OneFace(), upscale=2).restore(photo, w=0.5)
    assert np.abs(alone.image.astype(int) - outcomes[1].result.image).max() <= 1
    assert restorer.upscale == 1  # per-request options never change the shared restorer


def test_worker_setup_takes_the_task_from_the_weights_or_the_option(inpainting_weights):
    for task, expected in ((None, "inpainting"), ("restoration", "restoration")):
        api = RestorationAPI(RestorerSettings(str(inpainting_weights), task=task, cpu_threads=1), Limits())
        api.setup("cpu")
        try:
            assert api.batcher.restorer.task.name == expected
        finally:
            api.pool.shutdown()


@pytest.mark.slow
def test_server_with_inpainting_weights_over_http(inpainting_weights):
    import httpx

    face, holes = _holed_face(3)
    server = start_server(inpainting_weights)
    try:
        aligned = httpx.post(f"{server.url}/restore", files={"image": ("face.png", encode_image(face, "png"))},
                             data={"aligned": "true"}, timeout=60)
        whole = httpx.post(f"{server.url}/restore", files={"image": ("photo.png", encode_image(face, "png"))},
                           timeout=60)
    finally:
        server.stop()
    assert aligned.status_code == 200, aligned.text
    body = aligned.json()
    assert body["task"] == "inpainting" and [item["w"] for item in body["images"]] == [1.0]
    answer = decode_image(base64.b64decode(body["images"][0]["image"]))
    np.testing.assert_array_equal(answer[~holes], face[~holes])
    assert whole.status_code == 400 and "aligned faces only" in whole.json()["detail"]

"""``codeformer-serve`` end to end: a real server subprocess on localhost, real HTTP answers."""

from __future__ import annotations

import base64
import http.client
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MAX_BATCH_SIZE, MAX_IN_FLIGHT, MAX_PIXELS, MAX_REQUEST_BYTES, start_server
from serve_helpers import descendants, port_is_free, shared_file

from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import decode_image_with_alpha, encode_image, read_image

ALIGNED = ["0143.png", "0240.png", "0342.png", "0345.png", "0368.png", "0412.png"]


def post_file(url: str, path: Path | None = None, data: bytes | None = None, name: str = "face.png",
              **fields) -> httpx.Response:
    content = path.read_bytes() if path is not None else data
    return httpx.post(f"{url}/restore", files={"image": (path.name if path else name, content)},
                      data={k: v for k, v in fields.items()}, timeout=60)


def post_json(url: str, payload) -> httpx.Response:
    return httpx.post(f"{url}/restore", json=payload, timeout=60)


def image_bytes(body: dict, index: int = 0) -> bytes:
    return base64.b64decode(body["images"][index]["image"])


def stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()


def test_health_and_stats_endpoints(server):
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert (health.status_code, health.text) == (200, "ok")
    report = stats(server.url)
    assert report["max_batch_size"] == MAX_BATCH_SIZE and report["face_batch_size"] == MAX_BATCH_SIZE
    assert report["in_flight"] == 0


def test_aligned_face_equals_face_restorer(server, tiny_serve_model):
    path = shared_file("aligned", "0143.png")
    response = post_file(server.url, path, w=["0.3", "0.7"], aligned="true")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = FaceRestorer(tiny_serve_model).restore(read_image(path), w=[0.3, 0.7], aligned=True)
    assert body["faces"] == 1 and body["boxes"] == [[0.0, 0.0, 512.0, 512.0]]
    assert body["task"] == "restoration"  # the weights' variant
    assert [item["w"] for item in body["images"]] == [0.3, 0.7]
    assert (body["width"], body["height"]) == (32, 32)  # the tiny network's face size
    for index, w in enumerate([0.3, 0.7]):
        assert image_bytes(body, index) == encode_image(expected.images[w], "png"), f"w={w}"
    assert not np.array_equal(expected.images[0.3], expected.images[0.7])


def test_whole_photo_as_json_equals_face_restorer(server, tiny_serve_model):
    path = shared_file("whole", "03.jpg")
    payload = {"image": base64.b64encode(path.read_bytes()).decode(), "w": 0.5, "upscale": 2,
               "format": "jpeg", "quality": 90}
    response = post_json(server.url, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    photo = read_image(path)
    expected = FaceRestorer(tiny_serve_model, upscale=2).restore(photo, w=0.5)
    assert len(expected.faces) >= 1 and body["faces"] == len(expected.faces)
    np.testing.assert_allclose(body["boxes"], [f.box for f in expected.faces], atol=0.01)
    assert (body["width"], body["height"]) == (2 * photo.shape[1], 2 * photo.shape[0])
    assert body["format"] == "jpeg"
    assert image_bytes(body) == encode_image(expected.image, "jpeg", 90)


def test_no_face_comes_back_unchanged(server):
    yy, xx = np.mgrid[0:64, 0:96]
    rgb = np.stack([xx * 2, yy * 3, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    alpha = (255 - yy * 2).astype(np.uint8)
    response = post_file(server.url, data=encode_image(rgb, "png", alpha=alpha), name="gradient.png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["faces"] == 0 and body["boxes"] == [] and any("no face" in n for n in body["notes"])
    out_rgb, out_alpha = decode_image_with_alpha(image_bytes(body))
    np.testing.assert_array_equal(out_rgb, rgb)
    np.testing.assert_array_equal(out_alpha, alpha)


def test_concurrent_clients_are_batched(server, tiny_serve_model):
    paths = [shared_file("aligned", name) for name in ALIGNED[:MAX_IN_FLIGHT]]
    before = stats(server.url)
    barrier = threading.Barrier(len(paths))

    def client(path: Path) -> list[httpx.Response]:
        barrier.wait()
        return [post_file(server.url, path, w="0.5", aligned="true") for _ in range(2)]

    with ThreadPoolExecutor(len(paths)) as pool:
        responses = list(pool.map(client, paths))
    bodies = {}
    for path, answers in zip(paths, responses):
        for answer in answers:
            assert answer.status_code == 200, answer.text
            bodies.setdefault(path, []).append(answer.json())
    batch_sizes = [b["batch"]["requests"] for answers in bodies.values() for b in answers]
    call_sizes = [n for answers in bodies.values() for b in answers for n in b["batch"]["network_calls"]]
    assert max(batch_sizes) > 1, f"no request was batched with another: {batch_sizes}"
    assert max(call_sizes) > 1, f"no network call held faces of two requests: {call_sizes}"
    assert max(call_sizes) <= MAX_BATCH_SIZE
    after = stats(server.url)
    assert after["requests"] - before["requests"] == 2 * len(paths)
    assert any(int(size) > 1 for size in after["requests_per_batch"])
    assert any(int(size) > 1 for size in after["faces_per_network_call"])
    logged = [int(n) for n in re.findall(r"batch of (\d+) request", server.log)]
    assert logged and max(logged) > 1
    restorer = FaceRestorer(tiny_serve_model)
    for path, answers in bodies.items():
        alone = restorer.restore(read_image(path), w=0.5, aligned=True).image.astype(int)
        for body in answers:
            served = decode_image_with_alpha(image_bytes(body))[0].astype(int)
            # equal up to float rounding that depends on how many faces share a network call
            assert np.abs(served - alone).max() <= 1, path.name


def _tiny_png_of_pixels(width: int, height: int) -> bytes:
    return encode_image(np.zeros((height, width, 3), np.uint8), "png")


def _bad_requests(url: str, face: bytes) -> list[tuple[str, httpx.Response, int, str]]:
    def form(**fields):
        return httpx.post(f"{url}/restore", files={"image": ("face.png", face)}, data=fields, timeout=60)

    big = int(MAX_PIXELS ** 0.5) + 10
    return [
        ("non-image bytes", post_file(url, data=b"this is not an image at all", name="notes.txt"), 400,
         "not an image"),
        ("truncated file", post_file(url, data=face[: len(face) * 6 // 10]), 400, "truncated"),
        ("too many pixels", post_file(url, data=_tiny_png_of_pixels(big, big)), 413, "too large"),
        ("w above 1", form(w="1.5"), 400, "[0, 1]"),
        ("w below 0", form(w="-0.2"), 400, "[0, 1]"),
        ("w not a number", form(w="abc"), 400, "'w' must be a number"),
        ("w a JSON bool", post_json(url, {"image": base64.b64encode(face).decode(), "w": True}), 400,
         "'w' must be a number"),
        ("another file field", httpx.post(f"{url}/restore", data={"w": "0.5"}, files={"other": ("x", b"x")}, timeout=60),
         400, "unknown field"),
        ("no image (JSON)", post_json(url, {"w": 0.5}), 400, "no 'image'"),
        ("unknown field", form(fidelity="0.5"), 400, "unknown field(s) ['fidelity']"),
        ("bad base64", post_json(url, {"image": "not base64!"}), 400, "not valid base64"),
        ("invalid JSON", httpx.post(f"{url}/restore", content=b"{nope", headers={"content-type": "application/json"},
                                    timeout=60), 400, "not valid JSON"),
        ("JSON array", post_json(url, [1, 2]), 400, "must be an object"),
        ("plain text", httpx.post(f"{url}/restore", content=b"hello", headers={"content-type": "text/plain"},
                                  timeout=60), 415, "unsupported Content-Type"),
        ("broken multipart", httpx.post(f"{url}/restore", content=b"garbage",
                                        headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60),
         400, "multipart"),
        ("upscale too big", form(upscale="10"), 400, "'upscale' must lie in"),
        ("format gif", form(format="gif"), 400, "'format' must be png or jpeg"),
        ("aligned not a bool", form(aligned="maybe"), 400, "'aligned' must be true or false"),
    ]


def test_bad_inputs_get_4xx_naming_the_problem_and_the_server_keeps_serving(server):
    face_path = shared_file("aligned", "0240.png")
    face = face_path.read_bytes()
    failures = []
    for what, response, status, message in _bad_requests(server.url, face):
        detail = response.json().get("detail", "") if response.headers.get("content-type") == "application/json" else ""
        if response.status_code != status or message not in detail:
            failures.append(f"{what}: got {response.status_code} {response.text[:200]!r}, wanted {status} {message!r}")
    assert not failures, "\n".join(failures)
    good = post_file(server.url, face_path, aligned="true")
    assert good.status_code == 200 and good.json()["faces"] == 1


def test_bad_requests_do_not_fail_their_batch(server):
    face_path = shared_file("aligned", "0342.png")
    jobs = [{"w": "0.5"}, {"w": "2"}, {"w": "0.5"}, {"w": "x"}, {"w": "0.5"}]
    barrier = threading.Barrier(len(jobs))

    def client(fields):
        barrier.wait()
        return post_file(server.url, face_path, aligned="true", **fields)

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(client, jobs))
    assert [r.status_code for r in responses] == [200, 400, 200, 400, 200], [r.text[:100] for r in responses]
    good = [r.json() for r in responses if r.status_code == 200]
    assert all(body["faces"] == 1 for body in good)


def test_request_size_limit(server):
    oversized = b"\0" * (MAX_REQUEST_BYTES + 1000)
    declared = post_file(server.url, data=oversized)
    assert declared.status_code == 413
    assert f"limit of {MAX_REQUEST_BYTES} bytes" in declared.json()["detail"]

    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(10):
            yield b"x" * (MAX_REQUEST_BYTES // 5)

    streamed = httpx.post(f"{server.url}/restore", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert streamed.status_code == 413 and "over this server's limit" in streamed.json()["detail"]
    assert post_file(server.url, shared_file("aligned", "0345.png"), aligned="true").status_code == 200


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)  # a polling interval, not a wait for something to happen


def test_concurrency_limit(server):
    face_path = shared_file("aligned", "0368.png")
    request = httpx.Request("POST", f"{server.url}/restore", files={"image": ("face.png", face_path.read_bytes())},
                            data={"aligned": "true"})
    body = request.read()
    head = (f"POST /restore HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    held = []
    for _ in range(MAX_IN_FLIGHT):  # requests whose bodies are still arriving hold their slots
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head + body[:100])
        held.append(sock)
    try:
        _wait_for(lambda: stats(server.url)["in_flight"] == MAX_IN_FLIGHT)
        refused = post_file(server.url, face_path, aligned="true")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert f"{MAX_IN_FLIGHT} requests already in progress" in refused.json()["detail"]
        statuses = []
        for sock in held:
            sock.sendall(body[100:])
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            statuses.append(answer.status)
            answer.read()
        assert statuses == [200] * MAX_IN_FLIGHT
    finally:
        for sock in held:
            sock.close()
    _wait_for(lambda: stats(server.url)["in_flight"] == 0)
    assert post_file(server.url, face_path, aligned="true").status_code == 200


def _check_clean_shutdown(weights, sig: int) -> None:
    # a synthetic face, so that this runs without the shared photos: what is checked is the shutdown
    face = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    process = start_server(weights, max_batch_size=1)  # also exercises LitServe's unbatched loop
    answer = post_file(process.url, data=encode_image(face, "png"), aligned="true")
    assert answer.status_code == 200 and answer.json()["batch"]["requests"] == 1, answer.text
    children = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                for pid in descendants(process.process.pid)}
    assert children, "expected HTTP and inference worker processes"
    started = time.monotonic()
    code = process.stop(sig, timeout=30)
    took = time.monotonic() - started
    assert code == 0, process.log[-3000:]
    assert took < 20, f"shutdown took {took:.1f} s"
    assert port_is_free(process.port)

    def left_behind() -> dict[int, str]:
        return {pid: cmd for pid, cmd in children.items() if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}

    try:  # helpers such as multiprocessing's resource tracker exit when they see the main process gone
        _wait_for(lambda: not left_behind(), timeout=10)
    except AssertionError:
        raise AssertionError(f"processes left behind: {left_behind()}") from None
    # LitServe's worker monitor thread may poll its manager after shutting it down (a race inside
    # LitServe 0.2.19, logged as "Monitoring worker crashed"); any other traceback is ours
    assert process.log.count("Traceback") == process.log.count("Monitoring worker crashed"), process.log[-3000:]


def test_sigterm_shuts_down_cleanly(tiny_serve_weights):
    _check_clean_shutdown(tiny_serve_weights, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_shuts_down_cleanly(tiny_serve_weights):
    _check_clean_shutdown(tiny_serve_weights, signal.SIGINT)


def test_core_library_does_not_import_serving_frameworks():
    import subprocess
    import sys

    code = ("import sys, codeformer_lightning, codeformer_lightning.inference, codeformer_lightning.serve.protocol; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'litserve', 'gradio', 'fastapi', 'uvicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"

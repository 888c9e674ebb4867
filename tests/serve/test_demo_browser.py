"""``codeformer-demo`` in a real headless browser: Debian's Chromium driven by Playwright.

Uploads scikit-image's astronaut photo (a real face that ships with a core dependency), checks the
before/after view, the faces gallery and the download, moves the w slider and checks that the
result changes, and checks that unreadable uploads are reported in the page. Screenshots go to
``tests/serve/artifacts/`` (git-ignored), named after the step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ServerProcess

from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import decode_image, encode_image, read_image

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEMO_MAX_PIXELS = 300_000  # the astronaut (512 x 512) fits, a 600 x 600 image does not


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium browser installed (looked for $CHROMIUM_PATH, /usr/bin/chromium, "
                "chromium-browser): install it with `apt-get install chromium` (.ci/run does this as root)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(tiny_serve_weights):
    pytest.importorskip("gradio", reason="the [demo] extra (gradio) is not installed")
    process = ServerProcess("codeformer_lightning.serve.demo",
                            ["--weights", str(tiny_serve_weights), "--max-pixels", str(DEMO_MAX_PIXELS)],
                            ready_line="Running on local URL").wait_ready()
    yield process
    assert process.stop() == 0, process.log[-3000:]


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, text: str) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=90_000)
    return _status(page)


def _slider_images(page) -> tuple[str, str]:
    images = page.locator("#before-after img")
    assert images.count() == 2, "the before/after view should hold two images"
    return images.nth(0).get_attribute("src"), images.nth(1).get_attribute("src")


def _fetch(page, url: str) -> np.ndarray:
    response = page.request.get(url)
    assert response.ok, url
    return decode_image(response.body(), url)


def test_demo_page_restores_and_follows_the_slider(browser, demo, tiny_serve_model, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    photo_path = tmp_path / "astronaut.png"
    photo_path.write_bytes(encode_image(skimage_data.astronaut(), "png"))
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(demo.url, wait_until="networkidle")
    assert "Upload a photo to start" in _status(page)

    page.locator("#photo input[type=file]").set_input_files(str(photo_path))
    status = _wait_status(page, "w = 0.50")
    assert status.startswith("Restored 1 face"), status
    before_url, after_half_url = _slider_images(page)
    assert page.locator("#faces img").count() == 2  # the face's aligned input and its restoration
    page.screenshot(path=ARTIFACTS / "01_restored_w0.50.png", full_page=True)

    page.locator("#fidelity input[type=range]").fill("1")
    assert _wait_status(page, "w = 1.00").startswith("Restored 1 face")
    before_url_again, after_one_url = _slider_images(page)
    page.screenshot(path=ARTIFACTS / "02_restored_w1.00.png", full_page=True)
    before, after_half, after_one = (_fetch(page, u) for u in (before_url_again, after_half_url, after_one_url))
    np.testing.assert_array_equal(before, read_image(photo_path))
    assert after_half.shape == after_one.shape == before.shape
    changed = np.any(after_half != after_one, axis=-1)
    assert changed.any(), "the result did not change with w"
    # what the page shows is what the library computes (up to thread-count dependent rounding)
    expected = FaceRestorer(tiny_serve_model).restore(read_image(photo_path), w=1.0)
    assert np.abs(after_one.astype(int) - expected.image).max() <= 1
    x1, y1, x2, y2 = expected.faces[0].box
    margin = max(x2 - x1, y2 - y1)  # the pasted face reaches a little beyond the detection box
    rows, cols = np.nonzero(changed)
    assert rows.min() >= y1 - margin and rows.max() <= y2 + margin, "w changed pixels far from the face"
    assert cols.min() >= x1 - margin and cols.max() <= x2 + margin, "w changed pixels far from the face"

    with page.expect_download() as download:
        page.locator("#download").click()
    saved = ARTIFACTS / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "astronaut_restored_w1.00.png"
    np.testing.assert_array_equal(read_image(saved), after_one)

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(photo_path.read_bytes()[: photo_path.stat().st_size // 2])
    page.locator("#photo input[type=file]").set_input_files(str(truncated))
    message = _wait_status(page, "Could not read the image")
    assert "truncated" in message
    page.screenshot(path=ARTIFACTS / "03_error_truncated.png", full_page=True)

    too_big = tmp_path / "too_big.png"
    too_big.write_bytes(encode_image(np.full((600, 600, 3), 128, np.uint8), "png"))
    page.locator("#photo input[type=file]").set_input_files(str(too_big))
    message = _wait_status(page, "too large")
    assert f"limit {DEMO_MAX_PIXELS} px" in message
    page.screenshot(path=ARTIFACTS / "04_error_too_large.png", full_page=True)
    assert "Traceback" not in page.content()
    page.close()
    with capsys.disabled():
        print(f"\n[demo browser test] screenshots and the downloaded result in {ARTIFACTS}")

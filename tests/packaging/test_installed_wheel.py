"""A fresh virtual environment with only torch and the built wheel restores the faces of a whole
photo with the default detector, offline (slow: installs the wheel's dependencies)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
WHOLE = TESTS.parents[0] / ".." / "shared" / "faces" / "whole"

pytestmark = pytest.mark.slow


def _shared_photos() -> list[Path]:
    if not WHOLE.is_dir():
        pytest.skip(f"shared face photos not found at {WHOLE.resolve()}")
    return sorted(WHOLE.iterdir())


def test_the_installed_package_is_the_wheel_and_finds_faces_offline(installed_wheel):
    """Imported from the venv (not the source tree), its default MTCNN finds the labelled faces."""
    truth = json.loads((TESTS / "inference" / "whole_photo_faces.json").read_text())
    photos = [p for p in _shared_photos() if p.name in truth]
    script = (
        "import json, sys, codeformer_lightning\n"
        "from codeformer_lightning.inference import MTCNNDetector\n"
        "from codeformer_lightning.io import read_image\n"
        "detector = MTCNNDetector()\n"
        "counts = {p.rsplit('/', 1)[-1]: len(detector.detect(read_image(p))) for p in sys.argv[1:]}\n"
        "print(json.dumps({'file': codeformer_lightning.__file__, 'faces': counts}))\n"
    )
    done = installed_wheel.run("python", "-c", script, *[str(p.resolve()) for p in photos])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(installed_wheel.venv), report["file"]
    assert report["faces"] == {p.name: len(truth[p.name]["faces"]) for p in photos}
    assert installed_wheel.network_attempts() == ""


def test_codeformer_restore_from_the_wheel_restores_a_photo_offline(installed_wheel, tmp_path):
    """``codeformer-restore`` on a whole photo with published-layout (random) weights and the default
    detector: the face is found, restored and pasted back, and nothing touches the network."""
    sys.path.insert(0, str(TESTS))
    from published_files import KEYS_FILE, write_published_file

    if not KEYS_FILE.is_file():
        pytest.skip(f"published key list not found at {KEYS_FILE}")
    photo = next(p for p in _shared_photos() if p.name == "03.jpg")  # one face: one 512 px forward
    weights = write_published_file(tmp_path / "codeformer.pth", "codeformer")
    out = tmp_path / "out"
    done = installed_wheel.run("codeformer-restore", photo.resolve(), "-o", out, "--weights", weights, "-w", "0.5")
    restored = sorted((out / "restored_faces").glob("*.png"))
    final = sorted((out / "final_results").glob("*.png"))
    assert len(restored) == 1 and len(final) == 1, done.stdout + done.stderr
    assert installed_wheel.network_attempts() == ""
    # the guard works: a download attempt from that environment is refused and recorded
    probe = installed_wheel.run("python", "-c", "import urllib.request; urllib.request.urlopen('http://example.com')",
                                check=False)
    assert probe.returncode != 0 and "network access attempted" in probe.stderr
    assert installed_wheel.network_attempts().startswith(("resolve", "connect"))
    installed_wheel.network_log.unlink()  # the environment is shared: later tests start from an empty log

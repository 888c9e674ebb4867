"""Issue 13, item 11: the quickstart's face cache is keyed by everything that changes its faces (size,
held-out count, seed, version): a 64 px run after a 32 px one gets 64 px faces, not resized 32 px ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from codeformer_lightning.quickstart import FACES_VERSION, build_face_folder, cached_face_folder


def _sizes(folder: Path) -> set[tuple[int, int]]:
    return {Image.open(p).size for p in folder.glob("*.png")}


def test_one_cached_folder_per_size_and_settings(tmp_path):
    root = tmp_path / "quickstart_faces"
    small = cached_face_folder(root, size=32)
    large = cached_face_folder(root, size=64)
    other_split = cached_face_folder(root, size=32, num_val=4)
    assert small.name == f"32px_8val_seed0_v{FACES_VERSION}" and large != small and other_split not in (small, large)
    assert _sizes(small / "train") == {(32, 32)} and _sizes(large / "train") == {(64, 64)}
    assert len(list((other_split / "val").glob("*.png"))) == 4
    stamp = (small / "train" / "lfw_000.png").stat().st_mtime_ns
    assert cached_face_folder(root, size=32) == small  # reused, not rebuilt
    assert (small / "train" / "lfw_000.png").stat().st_mtime_ns == stamp


def test_a_folder_of_other_faces_is_never_reused_silently(tmp_path):
    folder = build_face_folder(tmp_path / "faces", size=32)
    with pytest.raises(ValueError, match=r"holds other quickstart faces \(size=32 .*\) than asked for \(size=64"):
        build_face_folder(folder, size=64)


def test_a_64px_run_after_a_32px_one_trains_on_64px_faces(tmp_path):
    data_dir = tmp_path / "data"
    cached_face_folder(data_dir / "quickstart_faces", size=32)  # what an earlier 32 px quickstart left
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-m", "codeformer_lightning.commands.train", "experiment=quickstart_vqgan",
         "model.net.img_size=64", "data.image_size=64", "trainer.max_steps=1", "trainer.val_check_interval=1",
         "trainer.enable_model_summary=false", f"paths.data_dir={data_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "resized to" not in done.stdout + done.stderr
    faces = data_dir / "quickstart_faces" / f"64px_8val_seed0_v{FACES_VERSION}"
    assert _sizes(faces / "train") == {(64, 64)} and _sizes(faces / "val") == {(64, 64)}

"""The wheel holds every file that the package reads at run time (fast: builds it, installs nothing)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

#: files default code paths cannot work without, named explicitly (on top of the general rule below)
RUNTIME_FILES = [
    "codeformer_lightning/inference/weights/mtcnn/pnet.safetensors",
    "codeformer_lightning/inference/weights/mtcnn/rnet.safetensors",
    "codeformer_lightning/inference/weights/mtcnn/onet.safetensors",
    "codeformer_lightning/inference/weights/mtcnn/NOTICE.md",
    "codeformer_lightning/conf/train.yaml",
]


def package_data_files(source_tree) -> dict[str, bytes]:
    """Every non-Python file inside the package folder of ``source_tree`` (through the ``conf``
    symlink), by its path in a wheel, with its bytes."""
    found = {}
    for folder, dirs, files in os.walk(source_tree / "codeformer_lightning", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith((".py", ".pyc")):
                path = Path(folder) / name
                found[path.relative_to(source_tree).as_posix()] = path.read_bytes()
    return found


def test_wheel_holds_every_runtime_data_file(built_wheel, source_tree):
    with zipfile.ZipFile(built_wheel) as wheel:
        names = set(wheel.namelist())
        expected = package_data_files(source_tree)
        assert set(RUNTIME_FILES) <= set(expected), "the source tree lacks a runtime file"
        assert sum(name.startswith("codeformer_lightning/conf/") for name in expected) > 20
        missing = sorted(set(expected) - names)
        assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
        for name, data in expected.items():
            assert hashlib.sha256(wheel.read(name)).digest() == hashlib.sha256(data).digest(), name
        # weight files must stay readable by every user once installed
        for name in RUNTIME_FILES:
            mode = (wheel.getinfo(name).external_attr >> 16) & 0o777
            assert mode & 0o444 == 0o444, f"{name} has mode {oct(mode)}"

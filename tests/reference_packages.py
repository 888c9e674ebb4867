"""Reference implementations from other packages (``torchvision``, ``lpips``) for comparison tests.

They are installed into a folder of their own, ``.venv/reference`` (``scripts/install.sh``)::

    python -m pip install --no-deps --upgrade --target .venv/reference "torchvision==0.28.*" "lpips==0.1.4"

and never into the environment itself: the registry's torchvision wheels are built against CUDA
torch. With the CPU torch this project installs, torchvision's compiled operators fail to load and
its import then raises ("operator torchvision::nms does not exist"); since torchmetrics (so
Lightning) imports torchvision whenever it is installed, the whole package would stop importing.
Here the folder is put on ``sys.path`` only by the tests that ask for it, after declaring the two
operator schemas that torchvision registers unconditionally (nms, qnms; never called by these
tests), so the pure-Python parts we compare with (``transforms.functional``, lpips) import cleanly.
A test skips, saying how to install them, when the folder is absent.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REFERENCE_DIR = Path(os.environ.get("CODEFORMER_REFERENCE_PACKAGES", Path(sys.prefix) / "reference"))
INSTALL_HINT = (
    f'python -m pip install --no-deps --upgrade --target {REFERENCE_DIR} "torchvision==0.28.*" "lpips==0.1.4"'
)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_stub_library = None


def _declare_missing_torchvision_ops() -> None:
    """Declare nms/qnms when torchvision's compiled operators are unavailable (CPU torch)."""
    global _stub_library
    if _stub_library is not None:
        return
    missing = [name for name in _SCHEMAS if not torch._C._dispatch_has_kernel(f"torchvision::{name}")]
    try:
        torch.ops.load_library(str(next((REFERENCE_DIR / "torchvision").glob("_C*.so"))))
        return  # a torchvision built for this torch: nothing to declare
    except (OSError, StopIteration, RuntimeError):
        pass
    if missing:
        _stub_library = torch.library.Library("torchvision", "DEF")
        for name in missing:
            _stub_library.define(_SCHEMAS[name])


def import_reference(name: str) -> ModuleType:
    """Import ``name`` (e.g. ``torchvision.transforms.functional``, ``lpips``) from the reference
    folder, or skip the calling test with the install command."""
    top = name.split(".")[0]
    if top not in sys.modules and not (REFERENCE_DIR / top).is_dir():
        pytest.skip(f"reference package {top} not installed; install it with: {INSTALL_HINT}")
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.append(str(REFERENCE_DIR))  # appended: the environment's own packages still win
    _declare_missing_torchvision_ops()
    return importlib.import_module(name)

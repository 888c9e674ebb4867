"""Fixtures for the evaluation tests: random weight files in the published key layouts, image folders.

The key layouts are written out here independently of the package (torchvision's vgg16
``features.N``; insightface arcface_torch IResNet), so loading is tested against the real layouts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from random_weights import random_vgg16_state


def vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_vgg16_state(seed)


def arcface_state(
    layers: tuple[int, int, int, int], seed: int = 0, num_features: int = 512
) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys and shapes of arcface_torch's ``iresnet`` backbones."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (k * k * cin)) ** 0.5

    def bn(name: str, c: int, scale: float = 1.0) -> None:
        state[f"{name}.weight"] = (1 + 0.1 * torch.randn(c, generator=g)) * scale
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
        state[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, 3, 3)
    bn("bn1", 64)
    state["prelu.weight"] = torch.full((64,), 0.25)
    cin = 64
    for stage, (cout, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            bn(f"{p}.bn1", cin)
            conv(f"{p}.conv1", cout, cin, 3)
            bn(f"{p}.bn2", cout)
            state[f"{p}.prelu.weight"] = torch.full((cout,), 0.25)
            conv(f"{p}.conv2", cout, cout, 3)
            bn(f"{p}.bn3", cout, scale=0.2)  # small residual branches keep deep random nets finite
            if b == 0:  # every stage starts with a stride-2 block, so it has a projection
                conv(f"{p}.downsample.0", cout, cin, 1)
                bn(f"{p}.downsample.1", cout)
            cin = cout
    bn("bn2", 512)
    state["fc.weight"] = torch.randn(num_features, 512 * 49, generator=g) * (1.0 / (512 * 49)) ** 0.5
    state["fc.bias"] = torch.zeros(num_features)
    bn("features", num_features)
    return state


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(vgg_state(), path)
    return path


@pytest.fixture(scope="session")
def arcface_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    torch.save(arcface_state((2, 2, 2, 2)), path)  # IResNet-18 layout: the fastest to run
    return path


@pytest.fixture(autouse=True)
def _empty_torch_hub(tmp_path, monkeypatch):
    """No test may pick up real weights from the machine's torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def random_faces(n: int, size: int = 32, seed: int = 0, lo: int = 40, hi: int = 215) -> list[np.ndarray]:
    """Smooth random ``(size, size, 3) uint8`` images with values in [lo, hi] (room for offsets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(1, 3, size // 4, size // 4, generator=g)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
        out.append((lo + x * (hi - lo)).round().byte().permute(1, 2, 0).numpy())
    return out


def write_folder(folder: Path, images: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}{suffix}")
    return folder

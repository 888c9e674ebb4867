"""Random weight files in published key layouts, for tests that exercise loading code paths.

The layouts are written out here independently of the package, so loading is tested against the
real layouts rather than against the package's own idea of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: torchvision ``vgg16().features`` conv layers: (index, in channels, out channels).
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512)]


def random_vgg16_state(seed: int = 0, bias_std: float = 0.01, dtype: torch.dtype = torch.float32,
                       classifier: bool = False) -> dict[str, torch.Tensor]:
    """He-initialised weights with torchvision's vgg16 keys (``features.N.weight/bias``).

    ``classifier``: also a ``classifier.0.weight`` entry, as real torchvision files hold.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, cin, cout in VGG16_CONVS:
        state[f"features.{idx}.weight"] = (torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5).to(dtype)
        bias = torch.randn(cout, generator=g) * bias_std if bias_std else torch.zeros(cout)
        state[f"features.{idx}.bias"] = bias.to(dtype)
    if classifier:
        state["classifier.0.weight"] = torch.zeros(4, 4)
    return state


def write_random_vgg16(path: str | Path, **kwargs) -> str:
    """Save :func:`random_vgg16_state` (kwargs passed on) to ``path``; returns the path as str."""
    torch.save(random_vgg16_state(**kwargs), path)
    return str(path)

"""The published inference scripts of the task variants, written out plainly for the tests.

``inference_colorization.py`` and ``inference_inpainting.py`` of the published code, step by step:
an ``(H, W, 3)`` uint8 RGB face -> ``img2tensor(face / 255.)`` -> ``normalize(0.5, 0.5)`` -> the
network at the task's ``w`` and AdaIN -> (inpainting) ``(1 - mask) * input + mask * output`` with
``mask`` where the three channels sum to 3 -> ``tensor2img(min_max=(-1, 1))`` (clamp, rescale,
round). Independent of ``codeformer_lightning.inference``: only the network is passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Network = Callable[..., torch.Tensor]  # (x, w=..., adain=...) -> image (B,3,S,S), clamped or not


def to_network_input(face: np.ndarray) -> torch.Tensor:
    """img2tensor(face / 255.) then normalize(mean=0.5, std=0.5), as the scripts do."""
    x = torch.from_numpy(face / 255.0).float().permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """tensor2img(x, min_max=(-1, 1)): clamp, to [0, 1], * 255, round -> (H, W, 3) uint8."""
    x = (x[0].float().clamp(-1, 1) + 1) / 2
    return (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def published_colorization(network: Network, face: np.ndarray) -> np.ndarray:
    """inference_colorization.py: w fixed to 0, adain=True; the output is the network's image."""
    with torch.no_grad():
        return to_uint8(network(to_network_input(face), w=0, adain=True))


def published_inpainting(network: Network, face: np.ndarray) -> np.ndarray:
    """inference_inpainting.py: mask = pure-white pixels, w fixed to 1, adain=False, composite."""
    x = to_network_input(face)
    size_h, size_w = face.shape[:2]
    with torch.no_grad():
        mask = torch.zeros(size_h, size_w)
        mask[torch.sum(x[0], dim=0) == 3] = 1.0
        mask = mask.view(1, 1, size_h, size_w)
        out = network(x, w=1, adain=False)
        out = (1 - mask) * x + mask * out
    return to_uint8(out)


def first_output(module: torch.nn.Module) -> Network:
    """The published network returns ``(image, logits, lq_feat)``; the scripts take ``[0]``."""

    def call(x, w, adain):
        return module(x, w=w, adain=adain)[0]

    return call

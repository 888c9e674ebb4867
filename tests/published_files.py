"""Weight files in the published layout, filled with random tensors of the listed shapes.

``shared/official_checkpoint_keys.json`` lists every tensor name and shape of each published file;
the published weights themselves cannot be downloaded here. The values are drawn so that
activations keep a realistic scale through the ~60 layers (variance-preserving weights, norm gains
near 1) and the image output is of the order of [-1, 1], like a trained model's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

SHARED = Path(os.environ.get("CODEFORMER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
KEYS_FILE = SHARED / "official_checkpoint_keys.json"
KINDS = ("codeformer", "codeformer_colorization", "codeformer_inpainting", "vqgan_code1024", "vqgan_discriminator")


def published_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(KEYS_FILE.read_text())[kind].items()}


def random_published_state(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in published_shapes(kind).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name == "quantize.embedding.weight":
            state[name] = torch.randn(shape, generator=g)
        elif name == "position_emb":
            state[name] = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif ".norm" in name and name.endswith("weight") or ".0.weight" in name and "idx_pred" in name:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, norm shifts
            state[name] = 0.05 * torch.randn(shape, generator=g)
    last = [k for k in state if k.startswith("generator.blocks.") and k.endswith(".weight") and state[k].ndim == 4]
    if last:  # the image head: a trained model outputs values of the order of [-1, 1]
        state[last[-1]] *= 1.0
    return state


def write_published_file(path: Path, kind: str, key: str | None = "params_ema", seed: int = 0) -> Path:
    """Write a random file of ``kind``; ``key=None`` writes a bare state dict."""
    state = random_published_state(kind, seed)
    torch.save(state if key is None else {key: state}, path)
    return path

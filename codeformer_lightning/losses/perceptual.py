"""LPIPS perceptual distance with a VGG16 backbone, loaded from local files only.

The VGG16 convolution stack is written out here (torchvision is not a dependency) and reads
torchvision's ImageNet weights (``vgg16-397923af.pth``, keys ``features.N.weight``). The LPIPS v0.1
linear heads (``vgg.pth`` of the ``lpips`` package, keys ``linK.model.1.weight``) are optional:
without them every channel gets the same weight (the "baseline" variant of Zhang et al. 2018).

Nothing is downloaded. The weights are frozen and held as non-persistent buffers, so a training
checkpoint never carries the 58 MB backbone.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

#: torchvision ``vgg16().features`` conv layers as (index in that Sequential, in, out channels); each
#: conv3x3 is followed by a ReLU, and a 2x2 max-pool sits after indices 2, 7, 14, 21 (and 28, unused).
VGG16_CONVS: tuple[tuple[int, int, int], ...] = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)  # fmt: skip
_TAPS = (2, 7, 14, 21, 28)  # convs whose ReLU output LPIPS compares: relu1_2, 2_2, 3_3, 4_3, 5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _hub_vgg16_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _missing_message(what: str) -> str:
    return (
        f"{what}. The LPIPS perceptual loss needs VGG16 ImageNet weights, which are never downloaded "
        f"at run time: get torchvision's {VGG16_FILE} ({VGG16_URL}) and pass its path as "
        f"weights_path (loss config: perceptual_weights_path), or put it at {_hub_vgg16_path()} "
        "(the torch hub cache). Optionally add the LPIPS v0.1 linear heads vgg.pth "
        f"({LPIPS_LINEAR_URL}) as linear_weights_path. To train without a perceptual loss, set its "
        "weight to 0 (perceptual_weight: 0)."
    )


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(_missing_message(f"{path}: no such file"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a state dict of VGG16/LPIPS weights")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key layouts we read -> ``features.N.{weight,bias}`` and ``linK.weight``.

    torchvision vgg16 (``features.N.*``), the lpips package's whole model (``net.sliceK.N.*``,
    ``linK.model.1.weight``), its linear-head file (``linK.model.1.weight``), or any mix of them.
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key):
            out[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"lin(\d)(?:\.model\.1)?\.weight", key):
            out[f"lin{m.group(1)}.weight"] = value
    return out


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018) with a VGG16 backbone.

    ``forward(x, y)``: images ``(B, 3, H, W)`` in [-1, 1] -> distances ``(B,)`` (>= 0, 0 iff the
    features agree). Always in eval mode, no trainable parameters, gradients flow to the inputs.

    Args:
        weights_path: VGG16 ImageNet weights in torchvision's layout (``features.N.weight``), or one
            file that also holds the linear heads (e.g. the lpips package's full model). ``None``:
            the torch hub cache's ``checkpoints/vgg16-397923af.pth`` if present.
        linear_weights_path: the LPIPS v0.1 linear heads (lpips' ``weights/v0.1/vgg.pth``). ``None``:
            taken from ``weights_path`` if it has them, else from an installed ``lpips`` package,
            else uniform channel weights (with a warning).
        imagenet_prenorm: first map inputs to [0, 1] and normalise with ImageNet mean/std, as the
            published CodeFormer training does before calling LPIPS (which then applies its own
            scaling on top). Off: the standard LPIPS input handling.

    Raises FileNotFoundError naming the missing file and where to get it; ValueError when a file
    lacks keys or has wrong shapes.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        linear_weights_path: str | Path | None = None,
        imagenet_prenorm: bool = False,
    ) -> None:
        super().__init__()
        self.imagenet_prenorm = imagenet_prenorm
        # buffers, not parameters: frozen, moved by .to(), left out of state_dict()
        for idx, cin, cout in VGG16_CONVS:
            self.register_buffer(f"conv{idx}_weight", torch.zeros(cout, cin, 3, 3), persistent=False)
            self.register_buffer(f"conv{idx}_bias", torch.zeros(cout), persistent=False)
        for k, c in enumerate(LPIPS_CHANNELS):
            self.register_buffer(f"lin{k}", torch.full((1, c, 1, 1), 1.0 / c), persistent=False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.has_linear_heads = False
        self.weights_path, self.linear_weights_path = self._load(weights_path, linear_weights_path)
        self.eval()

    # ------------------------------------------------------------------------- loading
    def _load(self, weights_path, linear_weights_path) -> tuple[Path, Path | None]:
        if weights_path is None:
            weights_path = _hub_vgg16_path()
            if not weights_path.is_file():
                raise FileNotFoundError(_missing_message("No VGG16 weights given and none in the torch hub cache"))
        weights_path = Path(weights_path)
        state = _canonical(_read(weights_path))
        missing = [f"features.{i}.{p}" for i, _, _ in VGG16_CONVS for p in ("weight", "bias") if f"features.{i}.{p}" not in state]
        if missing:
            raise ValueError(
                f"{weights_path}: not VGG16 weights in torchvision's layout: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''} ({len(missing)} of {2 * len(VGG16_CONVS)} keys). "
                + _missing_message("Expected keys features.0.weight ... features.28.bias")
            )
        for idx, _, _ in VGG16_CONVS:
            self._copy(f"conv{idx}_weight", state[f"features.{idx}.weight"], weights_path)
            self._copy(f"conv{idx}_bias", state[f"features.{idx}.bias"], weights_path)

        lin_source: Path | None = None
        if linear_weights_path is not None:
            lin_source = Path(linear_weights_path)
            lin_state = _canonical(_read(lin_source))
        elif all(f"lin{k}.weight" in state for k in range(5)):
            lin_source, lin_state = weights_path, state
        elif (bundled := self._bundled_lpips_heads()) is not None:
            lin_source = bundled
            lin_state = _canonical(_read(bundled))
        if lin_source is None:
            warnings.warn(
                "LPIPS: no linear heads (LPIPS v0.1 vgg.pth) given; using equal channel weights. "
                f"Pass linear_weights_path (from {LPIPS_LINEAR_URL}) for the published LPIPS.",
                stacklevel=3,
            )
            return weights_path, None
        missing = [f"lin{k}.model.1.weight" for k in range(5) if f"lin{k}.weight" not in lin_state]
        if missing:
            raise ValueError(f"{lin_source}: not LPIPS linear heads: missing {missing} (lpips v0.1 vgg.pth layout)")
        for k in range(5):
            self._copy(f"lin{k}", lin_state[f"lin{k}.weight"], lin_source)
        self.has_linear_heads = True
        return weights_path, lin_source

    @staticmethod
    def _bundled_lpips_heads() -> Path | None:
        spec = importlib.util.find_spec("lpips")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
        return path if path.is_file() else None

    def _copy(self, name: str, value: torch.Tensor, source: Path) -> None:
        target = getattr(self, name)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value.float())

    # ------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: never in training mode

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B,3,H,W)`` in [-1,1] -> the five ReLU outputs relu1_2 .. relu5_3."""
        if self.imagenet_prenorm:
            x = ((x + 1) / 2 - self.mean) / self.std
        x = (x - self.shift) / self.scale
        feats = []
        for idx, _, _ in VGG16_CONVS:
            w, b = getattr(self, f"conv{idx}_weight"), getattr(self, f"conv{idx}_bias")
            x = F.relu(F.conv2d(x, w.to(x.dtype), b.to(x.dtype), padding=1))
            if idx in _TAPS:
                feats.append(x)
                if len(feats) == len(_TAPS):
                    break
                x = F.max_pool2d(x, 2)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k, f in enumerate(self.features(torch.cat([x, y]))):
            a, b = f.float().chunk(2)
            # unit-normalise each position's feature vector (eps as in the reference implementation)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((a - b).pow(2), getattr(self, f"lin{k}")).mean(dim=(1, 2, 3))
        return total

"""LPIPS perceptual distance with a VGG16 backbone, loaded from local files only.

The VGG16 convolution stack is written out here (torchvision is not a dependency) and reads
torchvision's ImageNet weights (``vgg16-397923af.pth``, keys ``features.N.weight``), which the user
supplies. The LPIPS v0.1 linear heads ship with this package (``weights/lpips_vgg_v0.1.safetensors``:
``weights/v0.1/vgg.pth`` of the ``lpips`` package, BSD licence, see ``weights/LICENSE-lpips.txt``)
and are used by default, so the distance is the published one. Equal channel weights (the
"baseline" variant of Zhang et al. 2018, a different loss) only on request: ``uniform_heads=True``.

Nothing is downloaded. The weights are frozen and held as non-persistent buffers, so a training
checkpoint never carries the 58 MB backbone. Error messages name the settings the way the caller
exposes them (:class:`SettingNames`: config keys in the training stages, arguments otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
#: the LPIPS v0.1 VGG heads shipped with the package
BUNDLED_HEADS = Path(__file__).resolve().parent / "weights" / "lpips_vgg_v0.1.safetensors"

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


@dataclass(frozen=True)
class SettingNames:
    """How the caller names the LPIPS settings, for the hints of error messages.

    ``weights``, ``heads``, ``uniform_heads``: the settings (config keys such as
    ``model.perceptual_weights``, or argument names) of the VGG16 file, the heads file and equal
    channel weights (``None``: the caller has no such setting); ``off``: a whole setting that turns
    LPIPS off (e.g. ``model.perceptual_weight=0``), or ``None``.
    """

    weights: str = "weights_path"
    heads: str | None = "linear_weights_path"
    uniform_heads: str | None = "uniform_heads"
    off: str | None = None


def _hub_vgg16_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _missing_vgg_message(what: str, names: SettingNames) -> str:
    off = f" To run without it, set `{names.off}`." if names.off else ""
    return (
        f"{what}. LPIPS needs torchvision's VGG16 ImageNet weights {VGG16_FILE} ({VGG16_URL}), which are "
        f"never downloaded at run time: set `{names.weights}=/path/to/{VGG16_FILE}`, or put the file at "
        f"{_hub_vgg16_path()} (the torch hub cache).{off}"
    )


def _missing_heads_message(what: str, names: SettingNames) -> str:
    options = (
        [f"`{names.heads}=/path/to/vgg.pth` (the LPIPS v0.1 heads, {LPIPS_LINEAR_URL})"]
        if names.heads
        else []
    )
    if names.uniform_heads:
        options.append(
            f"`{names.uniform_heads}=true` for equal channel weights (the LPIPS baseline, not the published loss)"
        )
    if names.off:
        options.append(f"`{names.off}` to run without LPIPS")
    return f"{what}. Set " + ", or ".join(options) + "." if options else f"{what}."


def _read(path: Path, missing_message) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(missing_message(f"{path}: no such file"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict of VGG16/LPIPS weights"
        )
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
        linear_weights_path: LPIPS linear heads (lpips' ``weights/v0.1/vgg.pth`` layout). ``None``:
            those in ``weights_path`` if it has them, else the v0.1 heads shipped with this package.
        imagenet_prenorm: first map inputs to [0, 1] and normalise with ImageNet mean/std, as the
            published CodeFormer training does before calling LPIPS (which then applies its own
            scaling on top). Off: the standard LPIPS input handling. ``forward`` can override it
            per call, so one instance serves as loss and as standard metric.
        uniform_heads: equal channel weights instead of heads (the LPIPS "baseline"; not the
            published loss). Cannot be combined with ``linear_weights_path``.
        names: how the caller exposes these settings, for the hints of error messages.

    Raises FileNotFoundError naming the missing file and the setting that fixes it; ValueError when
    a file lacks keys or has wrong shapes.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        linear_weights_path: str | Path | None = None,
        imagenet_prenorm: bool = False,
        uniform_heads: bool = False,
        names: SettingNames = SettingNames(),
    ) -> None:
        super().__init__()
        self.imagenet_prenorm = imagenet_prenorm
        self.names = names
        # buffers, not parameters: frozen, moved by .to(), left out of state_dict()
        for idx, cin, cout in VGG16_CONVS:
            self.register_buffer(f"conv{idx}_weight", torch.zeros(cout, cin, 3, 3), persistent=False)
            self.register_buffer(f"conv{idx}_bias", torch.zeros(cout), persistent=False)
        for k, c in enumerate(LPIPS_CHANNELS):
            self.register_buffer(f"lin{k}", torch.full((1, c, 1, 1), 1.0 / c), persistent=False)
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.weights_path, state = self._load_backbone(weights_path)
        self.linear_weights_path = self._load_heads(state, linear_weights_path, uniform_heads)
        self.has_linear_heads = self.linear_weights_path is not None
        self.eval()

    # ------------------------------------------------------------------------- loading
    def _load_backbone(self, weights_path) -> tuple[Path, dict[str, torch.Tensor]]:
        """Copy the VGG16 convolutions in; returns the file and its canonical state (maybe with heads)."""
        if weights_path is None:
            weights_path = _hub_vgg16_path()
            if not weights_path.is_file():
                raise FileNotFoundError(
                    _missing_vgg_message("No VGG16 weights given and none in the torch hub cache", self.names)
                )
        weights_path = Path(weights_path)
        state = _canonical(_read(weights_path, lambda what: _missing_vgg_message(what, self.names)))
        missing = [
            f"features.{i}.{p}"
            for i, _, _ in VGG16_CONVS
            for p in ("weight", "bias")
            if f"features.{i}.{p}" not in state
        ]
        if missing:
            raise ValueError(
                f"{weights_path}: not VGG16 weights in torchvision's layout: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''} ({len(missing)} of {2 * len(VGG16_CONVS)} keys). "
                + _missing_vgg_message("Expected keys features.0.weight ... features.28.bias", self.names)
            )
        for idx, _, _ in VGG16_CONVS:
            self._copy(f"conv{idx}_weight", state[f"features.{idx}.weight"], weights_path)
            self._copy(f"conv{idx}_bias", state[f"features.{idx}.bias"], weights_path)
        return weights_path, state

    def _load_heads(self, backbone_state, linear_weights_path, uniform_heads: bool) -> Path | None:
        """Copy the linear heads in (see the class docstring for where they come from)."""
        if uniform_heads:
            if linear_weights_path is not None:
                raise ValueError(
                    f"both linear heads ({linear_weights_path}) and uniform heads requested: "
                    f"unset `{self.names.heads}` or `{self.names.uniform_heads}`"
                )
            return None
        if linear_weights_path is not None:
            source = Path(linear_weights_path)
        elif all(f"lin{k}.weight" in backbone_state for k in range(5)):
            source = self.weights_path
        else:
            source = BUNDLED_HEADS

        def missing(what: str) -> str:
            if source == BUNDLED_HEADS:
                what += " (the LPIPS v0.1 heads that ship with codeformer_lightning: reinstall the package)"
            return _missing_heads_message(what, self.names)

        state = backbone_state if source == self.weights_path else _canonical(_read(source, missing))
        absent = [f"lin{k}.model.1.weight" for k in range(5) if f"lin{k}.weight" not in state]
        if absent:
            raise ValueError(
                _missing_heads_message(
                    f"{source}: not LPIPS linear heads: missing {absent} (lpips v0.1 vgg.pth layout)",
                    self.names,
                )
            )
        for k in range(5):
            self._copy(f"lin{k}", state[f"lin{k}.weight"], source)
        return source

    def _copy(self, name: str, value: torch.Tensor, source: Path) -> None:
        target = getattr(self, name)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(value.float())

    # ------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: never in training mode

    def features(self, x: torch.Tensor, imagenet_prenorm: bool | None = None) -> list[torch.Tensor]:
        """Images ``(B,3,H,W)`` in [-1,1] -> the five ReLU outputs relu1_2 .. relu5_3."""
        if self.imagenet_prenorm if imagenet_prenorm is None else imagenet_prenorm:
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

    def forward(self, x: torch.Tensor, y: torch.Tensor, imagenet_prenorm: bool | None = None) -> torch.Tensor:
        """Distances ``(B,)`` between ``x`` and ``y`` ``(B, 3, H, W)`` in [-1, 1]; ``imagenet_prenorm``
        overrides the instance's input handling for this call (``None``: keep it)."""
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k, f in enumerate(self.features(torch.cat([x, y]), imagenet_prenorm)):
            a, b = f.float().chunk(2)
            # unit-normalise each position's feature vector (eps as in the reference implementation)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((a - b).pow(2), getattr(self, f"lin{k}")).mean(dim=(1, 2, 3))
        return total

"""ArcFace IResNet face-recognition backbone, for the identity-similarity metric.

The architecture of insightface's ``arcface_torch`` IResNet (Deng et al., ArcFace, CVPR 2019;
Duta et al., improved ResNet), written out here so that its ``backbone.pth`` files load directly
(keys ``conv1.weight``, ``layer1.0.bn1.weight``, ..., ``fc.weight``, ``features.running_mean``).
The depth (18/34/50/100/200) is read off the file's keys. Input: ``(B, 3, 112, 112)`` RGB scaled to
[-1, 1]; output: ``(B, 512)`` embeddings (not normalised). Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Blocks per stage of the published depths.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
ARCFACE_SIZE = 112
ARCFACE_HELP = (
    "Identity similarity needs an ArcFace IResNet backbone from insightface's arcface_torch "
    "(e.g. ms1mv3_arcface_r50_fp16/backbone.pth or glint360k_cosface_r100_fp16_0.1/backbone.pth, "
    "see https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch); "
    "pass its path with --arcface-weights (library: arcface_weights=...)."
)

# Five-point templates (eyes, nose tip, mouth corners) in pixels: ArcFace's 112x112 crop and the
# FFHQ-style 512x512 alignment CodeFormer restores into. Used to cut the ArcFace crop out of an
# aligned face without detecting it again.
_ARCFACE_TEMPLATE = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
_FFHQ512_TEMPLATE = torch.tensor(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)


def aligned_face_crop_box() -> tuple[float, float, float]:
    """Where ArcFace's 112-px crop lies in an FFHQ-aligned face, as fractions of its side.

    Least-squares fit of ``ffhq = s * arcface + t`` (uniform scale, translation) over the five
    template points -> ``(left, top, side)``, each a fraction of the aligned image's side
    (about ``(0.129, 0.123, 0.744)``).
    """
    a, b = _ARCFACE_TEMPLATE.double(), _FFHQ512_TEMPLATE.double() / 512.0
    a_c, b_c = a - a.mean(0), b - b.mean(0)
    scale = (a_c * b_c).sum() / (a_c * a_c).sum()
    left, top = (b.mean(0) - scale * a.mean(0)).tolist()
    return left, top, float(scale * ARCFACE_SIZE)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace IResNet. ``(B, 3, 112, 112)`` RGB in [-1, 1] -> ``(B, num_features)`` embeddings.

    Args:
        layers: blocks in each of the four stages (see :data:`IRESNET_LAYERS`).
        num_features: embedding size (512 in all published backbones).
    """

    def __init__(self, layers: Sequence[int] = IRESNET_LAYERS[50], num_features: int = 512) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {tuple(layers)}")
        self.layers_config = tuple(int(n) for n in layers)
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for stage, (cout, n) in enumerate(zip((64, 128, 256, 512), self.layers_config), start=1):
            blocks = [IBasicBlock(cin, cout, stride=2)] + [IBasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)  # kept so the module tree mirrors the published one
        self.fc = nn.Linear(512 * 7 * 7, num_features)  # four stride-2 stages: 112 -> 7
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet_layers_from_state(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Count the blocks per stage from ``layerS.K.`` keys."""
    counts = [0, 0, 0, 0]
    for key in state:
        if m := re.match(r"layer([1-4])\.(\d+)\.", key):
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], block + 1)
    return counts[0], counts[1], counts[2], counts[3]


def load_arcface(path: str | Path, map_location: str | torch.device = "cpu") -> IResNet:
    """Read an arcface_torch ``backbone.pth`` (or ``.safetensors``) -> :class:`IResNet` in eval mode.

    Raises FileNotFoundError (with where to get the file) when ``path`` does not exist, ValueError
    naming the file when it is not an IResNet state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. {ARCFACE_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/safetensors errors: all mean "not a usable weight file"
        raise ValueError(
            f"{path}: cannot be read as a weight file ({type(exc).__name__}: {exc}). {ARCFACE_HELP}"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, expected an IResNet state dict. {ARCFACE_HELP}"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    layers = iresnet_layers_from_state(state)
    if "fc.weight" not in state or min(layers) == 0:
        raise ValueError(
            f"{path}: not an ArcFace IResNet backbone (no fc.weight / layer1..layer4 keys; found e.g. "
            f"{sorted(state)[:4]}). {ARCFACE_HELP}"
        )
    model = IResNet(layers, num_features=state["fc.weight"].shape[0])
    result = model.load_state_dict(state, strict=False)
    # BatchNorm's num_batches_tracked is absent from some exports and harmless; anything else is not
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: does not fit IResNet{tuple(layers)}: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. {ARCFACE_HELP}"
        )
    return model.to(map_location).eval()


def arcface_input(images: torch.Tensor, aligned: bool = True) -> torch.Tensor:
    """``(B, 3, H, W)`` float RGB in [0, 1] -> ArcFace input ``(B, 3, 112, 112)`` in [-1, 1].

    ``aligned``: the images are FFHQ-aligned faces (CodeFormer's input/output); the ArcFace crop is
    cut out by :func:`aligned_face_crop_box`. Otherwise the whole image is resized.
    """
    if aligned:
        left, top, side = aligned_face_crop_box()
        h, w = images.shape[-2:]
        # affine_grid works in [-1, 1] coordinates: centre and half-size of the crop box
        cx, cy = (left + side / 2) * 2 - 1, (top + side / 2) * 2 - 1
        theta = images.new_tensor([[side, 0.0, cx], [0.0, side, cy]]).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(theta, [images.shape[0], 3, ARCFACE_SIZE, ARCFACE_SIZE], align_corners=False)
        if min(h, w) > 2 * ARCFACE_SIZE:  # pre-shrink large faces so bilinear sampling does not alias
            scale = 2 * ARCFACE_SIZE / (side * min(h, w))
            images = F.interpolate(images, scale_factor=min(1.0, scale), mode="area")
        crop = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        crop = F.interpolate(images, size=(ARCFACE_SIZE, ARCFACE_SIZE), mode="bilinear", antialias=True)
    return crop * 2 - 1


@torch.inference_mode()
def identity_similarity(
    model: IResNet, restored: torch.Tensor, gt: torch.Tensor, aligned: bool = True
) -> torch.Tensor:
    """Cosine similarity of ArcFace embeddings, ``(B,)`` in [-1, 1] (1: same identity features).

    ``restored``, ``gt``: ``(B, 3, H, W)`` float RGB in [0, 1] (sizes may differ between the two).
    """
    device = next(model.parameters()).device
    a = model(arcface_input(restored.to(device), aligned))
    b = model(arcface_input(gt.to(device), aligned))
    return F.cosine_similarity(a.float(), b.float(), dim=1).clamp(-1, 1).cpu()

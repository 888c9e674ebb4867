"""Face detectors giving boxes, five landmarks and scores for alignment.

MTCNN (default). Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016. The network and the cascade below are this package's own
pure-torch code; the weights are read from the files that the ``facenet-pytorch`` wheel ships
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``). facenet-pytorch (Tim Esler) is MIT-licensed; its
MTCNN weights were converted from David Sandberg's TensorFlow ``facenet`` port (MIT), which in turn
converted the original Caffe models of Kaipeng Zhang's MTCNN release (MIT-licensed repository
``kpzhang93/MTCNN_face_detection_alignment``). Only the weight files are used: facenet-pytorch's own
code is not imported (it needs torchvision).

RetinaFace (the detector of the CodeFormer paper). Deng et al., "RetinaFace: Single-stage Dense Face
Localisation in the Wild", CVPR 2020. This package's own pure-torch ResNet-50 RetinaFace reads the
published ``detection_Resnet50_Final.pth`` (trained and released with biubug6/Pytorch_Retinaface,
MIT licence; redistributed by facexlib, MIT licence, which CodeFormer uses) from a path the user
gives; neither facexlib nor torchvision is needed. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the image given to ``detect``.

    box: ``(4,)`` float ``[x1, y1, x2, y2]``; landmarks: ``(5, 2)`` float ``(x, y)`` of left eye,
    right eye, nose tip, left and right mouth corner (the order of
    :data:`~codeformer_lightning.inference.align.FFHQ_TEMPLATE_512`); score: confidence in [0, 1].
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    def scaled(self, factor: float) -> Face:
        """The same face in the image resized by ``factor`` (pixel-centre convention of cv2.resize)."""
        shift = 0.5 * (factor - 1.0)
        return Face(self.box * factor + shift, self.landmarks * factor + shift, self.score)

    @property
    def size(self) -> float:
        """Geometric mean of the box's width and height, in pixels."""
        w, h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return float(np.sqrt(max(w, 0.0) * max(h, 0.0)))


class Detector(Protocol):
    """Anything with ``detect(image (H,W,3) uint8 RGB) -> list[Face]`` can drive the restorer."""

    def detect(self, image: np.ndarray) -> list[Face]: ...


class DetectorWeightsError(FileNotFoundError):
    """A detector's weight files (or the package providing them) are missing or unreadable."""


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(f"detectors take (H, W, 3) uint8 RGB images, got {shape} {getattr(image, 'dtype', type(image))}")


def detect_downscaled(detect, image: np.ndarray, max_side: int | None) -> list[Face]:
    """Run ``detect`` on a copy of ``image`` no larger than ``max_side`` px and map faces back.

    Huge photos (e.g. 8000 px) gain nothing from full-resolution detection but cost seconds
    and memory; faces stay found as long as they are larger than the detector's minimum size
    in the smaller copy.
    """
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return detect(image)
    factor = max_side / max(height, width)
    small = cv2.resize(image, (max(1, round(width * factor)), max(1, round(height * factor))),
                       interpolation=cv2.INTER_AREA)
    actual = small.shape[1] / width
    return [face.scaled(1.0 / actual) for face in detect(small)]


# ----------------------------------------------------------------------------- MTCNN networks
class _PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B,3,H,W) normalised RGB -> face probability (B,H',W'), box offsets (B,4,H',W')."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    # The weights come from a port whose dense layers flatten in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class _RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (N,3,24,24) -> probability (N,), box offsets (N,4)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_transposed(self.prelu3(self.conv3(x)))))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class _ONet(nn.Module):
    """Output net on 48x48 crops: final score, box offsets and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (N,3,48,48) -> probability (N,), box offsets (N,4), landmarks (N,10) = 5 x then 5 y."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_transposed(self.prelu4(self.conv4(x)))))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


# ----------------------------------------------------------------------------- box helpers
def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first.

    ``boxes`` (N,4) ``[x1,y1,x2,y2]`` in MTCNN's inclusive-pixel convention (width = x2-x1+1).
    ``mode``: ``"union"`` (IoU) or ``"min"`` (overlap over the smaller box, used last by MTCNN to
    drop a small box nested in a larger one).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        iw = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = iw * ih
        denom = np.minimum(area[best], area[rest]) if mode == "min" else area[best] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Apply box offsets (fractions of the box size) to ``boxes`` (N,4)."""
    extra = 1.0 if inclusive else 0.0
    size = np.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], 1)
    return boxes + offsets * np.concatenate([size, size], 1)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes (N,4) to squares around the same centre (the next stage takes square crops)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return np.stack([x1, y1, x1 + side, y1 + side], 1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut boxes (N,4) (1-based inclusive, truncated to integers) out of ``image``, zero-padding
    what lies outside, resized to ``size``; returns (N, size, size, 3) uint8."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.fix(boxes).astype(np.int64)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw < 1 or bh < 1:
            continue
        patch = np.zeros((bh, bw, 3), dtype=np.uint8)
        sx1, sy1 = max(x1 - 1, 0), max(y1 - 1, 0)
        sx2, sy2 = min(x2, width), min(y2, height)
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        patch[sy1 - (y1 - 1): sy2 - (y1 - 1), sx1 - (x1 - 1): sx2 - (x1 - 1)] = image[sy1:sy2, sx1:sx2]
        out[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _find_mtcnn_weights(weights_dir: str | Path | None) -> Path:
    names = ("pnet.pt", "rnet.pt", "onet.pt")
    if weights_dir is None:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise DetectorWeightsError(
                "MTCNN weights not found: the default detector reads pnet.pt, rnet.pt and onet.pt from the "
                "facenet-pytorch wheel. Install it without its dependencies "
                "(`pip install --no-deps facenet-pytorch==2.6.0`) or pass weights_dir= (--detector-weights) "
                "pointing to a folder holding those three files."
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    else:
        folder = Path(weights_dir)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DetectorWeightsError(
            f"MTCNN weight files {missing} missing in {folder}; put pnet.pt, rnet.pt and onet.pt "
            "(as shipped in facenet-pytorch's facenet_pytorch/data/) there, or reinstall "
            "`pip install --no-deps facenet-pytorch==2.6.0`."
        )
    return folder


class MTCNNDetector:
    """MTCNN cascade (P-Net proposals on an image pyramid, R-Net and O-Net refinement).

    ``weights_dir``: folder with ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (default: the facenet-pytorch
    wheel's data folder). ``min_face_size``: smallest face side searched, in pixels.
    ``thresholds``: face-probability cut-offs of the three stages. ``max_side``: larger photos are
    detected on a downscaled copy (see :func:`detect_downscaled`); None disables it.
    """

    pyramid_factor = 0.709  # published MTCNN scale step between pyramid levels

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        max_side: int | None = 2048,
    ) -> None:
        folder = _find_mtcnn_weights(weights_dir)
        self.device = torch.device(device)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = max_side
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            path = folder / f"{name}.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
            except Exception as err:  # corrupt file, wrong layout
                raise DetectorWeightsError(f"cannot load MTCNN weights from {path}: {err}") from err
            net.to(self.device).eval()

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """(N,H,W,3) uint8 -> (N,3,H,W) float in about [-1, 1], as the weights were trained."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        return (x - 127.5) * 0.0078125

    def _proposals(self, image: np.ndarray) -> np.ndarray:
        """Stage 1: (N, 9) rows ``[x1, y1, x2, y2, score, dx1, dy1, dx2, dy2]``."""
        height, width = image.shape[:2]
        cell, stride = 12, 2
        scale = cell / self.min_face_size
        side = min(height, width) * scale
        found = []
        while side >= cell:
            h, w = int(np.ceil(height * scale)), int(np.ceil(width * scale))
            level = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            prob, offsets = self.pnet(self._to_tensor(level[None]))
            prob, offsets = prob[0].cpu().numpy(), offsets[0].cpu().numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(ys):
                grid = np.stack([xs, ys], 1).astype(np.float64)
                top_left = np.floor((stride * grid + 1) / scale)
                bottom_right = np.floor((stride * grid + cell) / scale)
                rows = np.concatenate(
                    [top_left, bottom_right, prob[ys, xs][:, None], offsets[:, ys, xs].T], 1)
                found.append(rows[nms(rows[:, :4], rows[:, 4], 0.5)])
            scale *= self.pyramid_factor
            side *= self.pyramid_factor
        if not found:
            return np.zeros((0, 9))
        rows = np.concatenate(found)
        return rows[nms(rows[:, :4], rows[:, 4], 0.7)]

    @torch.inference_mode()
    def _detect_full(self, image: np.ndarray) -> list[Face]:
        rows = self._proposals(image)
        if len(rows) == 0:
            return []
        boxes = _square(_regress(rows[:, :4], rows[:, 5:9], inclusive=False))

        prob, offsets = self.rnet(self._to_tensor(_crops(image, boxes, 24)))
        prob, offsets = prob.cpu().numpy(), offsets.cpu().numpy()
        keep = prob > self.thresholds[1]
        boxes, prob, offsets = boxes[keep], prob[keep], offsets[keep]
        if len(boxes) == 0:
            return []
        keep = nms(boxes, prob, 0.7)
        boxes = _square(_regress(boxes[keep], offsets[keep]))

        prob, offsets, marks = self.onet(self._to_tensor(_crops(np.asarray(image), boxes, 48)))
        prob, offsets, marks = prob.cpu().numpy(), offsets.cpu().numpy(), marks.cpu().numpy()
        keep = prob > self.thresholds[2]
        boxes, prob, offsets, marks = boxes[keep], prob[keep], offsets[keep], marks[keep]
        if len(boxes) == 0:
            return []
        size_x = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        size_y = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        # the cascade works in 1-based pixel indices: subtract 1 for 0-based image coordinates
        points = np.stack([boxes[:, :1] + marks[:, :5] * size_x, boxes[:, 1:2] + marks[:, 5:] * size_y], 2) - 1
        boxes = _regress(boxes, offsets) - 1
        keep = nms(boxes, prob, 0.7, mode="min")
        faces = [Face(boxes[i].astype(np.float64), points[i].astype(np.float64), float(prob[i])) for i in keep]
        return sorted(faces, key=lambda f: -f.score)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB, best score first (empty list if none)."""
        _check_image(image)
        if min(image.shape[:2]) < 12:
            return []
        return detect_downscaled(self._detect_full, image, self.max_side)


# ----------------------------------------------------------------------------- RetinaFace
def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the building block of the published FPN/SSH layers,
    whose LeakyReLU has slope 0 at 256 channels, i.e. a plain ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Bottleneck(nn.Module):
    """ResNet-50 bottleneck (stride on the 3x3 conv), parameter names as torchvision's."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNet50Body(nn.Module):
    """ResNet-50 up to layer4, returning the stride-8, 16 and 32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers.append(nn.Sequential(*[_Bottleneck(cin if i == 0 else width * 4, width, stride if i == 0 else 1)
                                          for i in range(blocks)]))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _SSH(nn.Module):
    """Context module: concatenated 3x3, 5x5 and 7x7 (stacked 3x3) branches."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(channels, channels // 2, relu=False)
        self.conv5X5_1 = _conv_bn(channels, channels // 4)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, relu=False)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), channels: int = 256) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, channels, kernel=1) for c in in_channels)
        self.merge1 = _conv_bn(channels, channels)
        self.merge2 = _conv_bn(channels, channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p1, p2, p3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class _Head(nn.Module):
    def __init__(self, values: int, anchors: int = 2, channels: int = 256) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFaceNet(nn.Module):
    """RetinaFace with a ResNet-50 body, parameter names of the published checkpoint.

    ``forward(x)``: ``x`` (B,3,H,W) BGR minus the per-channel mean (104, 117, 123), unscaled ->
    box offsets (B,A,4), face probabilities (B,A), landmark offsets (B,A,10) for the A anchors of
    :func:`retinaface_priors`.
    """

    min_sizes = ((16, 32), (64, 128), (256, 512))
    steps = (8, 16, 32)
    variances = (0.1, 0.2)
    mean_bgr = (104.0, 117.0, 123.0)

    def __init__(self) -> None:
        super().__init__()
        self.body = _ResNet50Body()
        self.fpn = _FPN()
        self.ssh1, self.ssh2, self.ssh3 = _SSH(), _SSH(), _SSH()
        self.ClassHead = nn.ModuleList([_Head(2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.body(x))
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), feats)]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        scores = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1).softmax(-1)[..., 1]
        marks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return boxes, scores, marks


def retinaface_priors(height: int, width: int) -> np.ndarray:
    """Anchors (A, 4) ``[cx, cy, w, h]`` as fractions of the image, row-major per level, two sizes per cell."""
    rows = []
    for step, sizes in zip(RetinaFaceNet.steps, RetinaFaceNet.min_sizes):
        fh, fw = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / height, (np.arange(fw) + 0.5) * step / width, indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        rows.append(np.stack(per_size, 2).reshape(-1, 4))
    return np.concatenate(rows)


class RetinaFaceDetector:
    """RetinaFace-ResNet50 from the published ``detection_Resnet50_Final.pth`` (given by path).

    ``conf_threshold``: minimum face probability; ``nms_threshold``: IoU of suppressed duplicates;
    ``max_side``: as for :class:`MTCNNDetector`. Raises :class:`DetectorWeightsError` when the file is
    missing or is not that network.
    """

    def __init__(self, weights_path: str | Path | None, device: str | torch.device = "cpu",
                 conf_threshold: float = 0.8, nms_threshold: float = 0.4, max_side: int | None = 2048) -> None:
        if weights_path is None or not Path(weights_path).is_file():
            raise DetectorWeightsError(
                f"RetinaFace weights not found ({weights_path}): get detection_Resnet50_Final.pth (published with "
                "Pytorch_Retinaface and facexlib) and pass its path as weights_path= (--detector-weights), "
                "or use the default MTCNN detector")
        self.device = torch.device(device)
        self.conf_threshold = conf_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self.net = RetinaFaceNet()
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            # files saved by older torch lack BatchNorm's step counters, which inference never reads
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise KeyError(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        except Exception as err:
            raise DetectorWeightsError(
                f"{weights_path} is not a RetinaFace-ResNet50 weight file (detection_Resnet50_Final.pth): {err}"
            ) from err
        self.net.to(self.device).eval()

    @torch.inference_mode()
    def _detect_full(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).to(self.device).float()
        x = (x - torch.tensor(RetinaFaceNet.mean_bgr, device=self.device)).permute(2, 0, 1)[None]
        loc, score, marks = (t[0].float().cpu().numpy() for t in self.net(x))
        keep = score > self.conf_threshold
        priors = retinaface_priors(height, width)[keep]
        loc, score, marks = loc[keep], score[keep], marks[keep]
        v0, v1 = RetinaFaceNet.variances
        centre = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
        size = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
        scale = np.array([width, height], dtype=np.float64)
        boxes = np.concatenate([(centre - size / 2) * scale, (centre + size / 2) * scale], 1)
        points = (priors[:, None, :2] + marks.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]) * scale
        kept = nms(boxes, score, self.nms_threshold)
        return [Face(boxes[i], points[i], float(score[i])) for i in kept]

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB, best score first."""
        _check_image(image)
        return detect_downscaled(self._detect_full, image, self.max_side)

"""Face detectors giving boxes, five landmarks and scores for alignment.

MTCNN (default). Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016. The networks and the cascade below are this package's own
pure-torch code; the weights ship inside the package (``weights/mtcnn/*.safetensors``, read with
``importlib.resources``), converted from the ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` files of the
facenet-pytorch 2.6.0 wheel (Tim Esler, MIT licence), themselves converted from David Sandberg's
TensorFlow ``facenet`` port (MIT) of the Caffe models of Kaipeng Zhang's MTCNN release (MIT); source,
checksums and licence text in ``weights/mtcnn/NOTICE.md``. facenet-pytorch itself is not needed.

RetinaFace (the detector of the CodeFormer paper). Deng et al., "RetinaFace: Single-stage Dense Face
Localisation in the Wild", CVPR 2020. This package's own pure-torch ResNet-50 RetinaFace reads the
published ``detection_Resnet50_Final.pth`` (trained and released with biubug6/Pytorch_Retinaface,
MIT licence; redistributed by facexlib, MIT licence, which CodeFormer uses) from a path the user
gives; neither facexlib nor torchvision is needed. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

_T = TypeVar("_T")


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
def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2 of a map of even height and width: two elementwise maxima of
    strided views, several times faster on the CPU than ``max_pool2d`` with ``ceil_mode``."""
    x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(x[..., 0::2], x[..., 1::2])


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pooling with stride 2 and ``ceil_mode`` (the published R-Net/O-Net pooling) of a map
    (N,C,H,W), as elementwise maxima of strided views along rows, then columns: the same numbers,
    1.1-1.7x faster on the CPU than ``max_pool2d``, which also writes the indices of the maxima."""
    for dim in (-2, -1):
        n = x.shape[dim]
        m, k = -(-(n - 3) // 2) + 1, (n - 1) // 2  # windows; windows with all three inputs inside
        y = torch.maximum(x.narrow(dim, 0, 2 * m - 1)[_strided(dim)], x.narrow(dim, 1, 2 * m - 1)[_strided(dim)])
        third = y.narrow(dim, 0, k)
        torch.maximum(third, x.narrow(dim, 2, 2 * k - 1)[_strided(dim)], out=third)  # in place, no copy
        x = y
    return x


def _strided(dim: int) -> tuple[slice, ...]:
    """Index taking every second element along ``dim`` (-2 or -1) of a 4-d tensor."""
    return (Ellipsis, slice(None, None, 2)) if dim == -1 else (Ellipsis, slice(None, None, 2), slice(None))


def _prelu_few_channels(x: torch.Tensor, prelu: nn.PReLU) -> torch.Tensor:
    """``prelu(x)`` of a channels-last map ``x`` (N,C,H,W) with few channels: the same numbers, about
    2x faster on the CPU for P-Net's first layer (C=10).

    PReLU of a channels-last tensor runs with the C channels as its innermost loop, too short for
    vector instructions when C is ~10. The same memory read as rows of ``W*C`` values, with the
    weights repeated ``W`` times, gives the kernel long contiguous rows instead. (From C=16 on, the
    plain kernel is as fast.)
    """
    n, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        return prelu(x)
    rows = x.permute(0, 2, 3, 1).reshape(n * h, w * c)  # a view: channels-last memory is (N, H, W, C)
    return F.prelu(rows, prelu.weight.repeat(w)).view(n, h, w, c).permute(0, 3, 1, 2)


class _PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor, blocked: Sequence[tuple[slice, slice]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B,3,H,W) normalised RGB, H and W even -> face probability (B,H/2-5,W/2-5), box
        offsets (B,4,H/2-5,W/2-5).

        ``blocked``: ``(rows, cols)`` of the first feature map (size (H-2, W-2)) that take no part in
        pooling. A pyramid level of odd side placed in a packed canvas marks the feature column/row
        that reads past its edge: 2x2 pooling then sees only the level's own values, as the published
        ceil-mode pooling of the level alone does.
        """
        x = _prelu_few_channels(self.conv1(x), self.prelu1)
        for rows, cols in blocked:
            x[:, :, rows, cols] = -torch.inf
        x = self.prelu2(self.conv2(_max_pool_2x2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 2, 3, 1)  # (B, H', W', 32)
        # both 1x1 heads as one matrix product over channels (a 1x1 conv with 2 or 4 outputs takes
        # torch's slow convolution path)
        heads = F.linear(x, torch.cat([self.conv4_1.weight, self.conv4_2.weight]).flatten(1),
                         torch.cat([self.conv4_1.bias, self.conv4_2.bias])).permute(0, 3, 1, 2)
        return F.softmax(heads[:, :2], dim=1)[:, 1], heads[:, 2:]


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    # The weights come from a port whose dense layers flatten in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class _RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (N,3,24,24) -> probability (N,), box offsets (N,4)."""
        x = _max_pool_3x3(self.prelu1(self.conv1(x)))
        x = _max_pool_3x3(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_transposed(self.prelu3(self.conv3(x)))))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class _ONet(nn.Module):
    """Output net on 48x48 crops: final score, box offsets and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (N,3,48,48) -> probability (N,), box offsets (N,4), landmarks (N,10) = 5 x then 5 y."""
        x = _max_pool_3x3(self.prelu1(self.conv1(x)))
        x = _max_pool_3x3(self.prelu2(self.conv2(x)))
        x = _max_pool_2x2(self.prelu3(self.conv3(x)))  # 8x8: ceil_mode changes nothing
        x = self.prelu5(self.dense5(_flatten_transposed(self.prelu4(self.conv4(x)))))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


# ----------------------------------------------------------------------------- MTCNN weights
MTCNN_NETS = ("pnet", "rnet", "onet")
#: where the package keeps its MTCNN weights (``importlib.resources`` path below this module's package)
MTCNN_PACKAGE_WEIGHTS = ("weights", "mtcnn")


def _read_state(path: Path | None, resource=None) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (or facenet-pytorch's ``.pt``) ``path`` or a package resource."""
    if resource is not None:
        return safetensors_load(resource.read_bytes())
    if path.suffix == ".safetensors":
        return load_safetensors_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_mtcnn_weights(weights_dir: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The three MTCNN state dicts, ``{"pnet": ..., "rnet": ..., "onet": ...}``.

    ``weights_dir=None`` reads the ``.safetensors`` files shipped inside this package (converted from
    facenet-pytorch 2.6.0, MIT; see ``weights/mtcnn/NOTICE.md``). A folder given by the user holds
    ``pnet``, ``rnet`` and ``onet`` as ``.safetensors`` or as the ``.pt`` files of facenet-pytorch's
    ``facenet_pytorch/data``. Raises :class:`DetectorWeightsError` naming what is missing or unreadable.
    """
    states = {}
    package_dir = importlib.resources.files(__package__).joinpath(*MTCNN_PACKAGE_WEIGHTS)
    for net in MTCNN_NETS:
        path, resource = None, None
        if weights_dir is None:
            resource = package_dir.joinpath(f"{net}.safetensors")
            where = str(resource)
            if not resource.is_file():
                raise DetectorWeightsError(
                    f"MTCNN weight file {where} is missing from the installed codeformer_lightning package "
                    "(an incomplete install?): reinstall the package, or pass weights_dir= (--detector-weights) "
                    "naming a folder with pnet, rnet and onet .safetensors (or facenet-pytorch's .pt) files")
        else:
            found = [Path(weights_dir) / f"{net}{suffix}" for suffix in (".safetensors", ".pt")]
            found = [p for p in found if p.is_file()]
            if not found:
                raise DetectorWeightsError(
                    f"MTCNN weight file {net}.safetensors (or {net}.pt) missing in {weights_dir}: the folder must "
                    "hold pnet, rnet and onet as .safetensors or as facenet-pytorch's data/*.pt files; "
                    "weights_dir=None uses the weights shipped with this package")
            path = where = found[0]
        try:
            states[net] = _read_state(path, resource)
        except Exception as err:  # corrupt file, not a weight file
            raise DetectorWeightsError(f"cannot read MTCNN weights from {where}: {err}") from err
    return states


# ----------------------------------------------------------------------------- box helpers
def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first (ties: the earlier index first).

    ``boxes`` (N,4) ``[x1,y1,x2,y2]`` in MTCNN's inclusive-pixel convention (width = x2-x1+1).
    ``mode``: ``"union"`` (IoU) or ``"min"`` (overlap over the smaller box, used last by MTCNN to
    drop a small box nested in a larger one). Overlaps are computed for blocks of 512 boxes against
    all lower-scored ones at once; the greedy pass then only reads rows of those tables.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = np.asarray(boxes, np.float64).reshape(-1, 4)[order].T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    removed = np.zeros(len(order), bool)
    keep = []
    for start in range(0, len(order), 512):
        rows, cols = slice(start, start + 512), slice(start, None)
        iw = np.maximum(0.0, np.minimum(x2[rows, None], x2[cols]) - np.maximum(x1[rows, None], x1[cols]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[rows, None], y2[cols]) - np.maximum(y1[rows, None], y1[cols]) + 1)
        inter = iw * ih
        denom = np.minimum(area[rows, None], area[cols]) if mode == "min" else area[rows, None] + area[cols] - inter
        suppresses = np.triu(inter > threshold * denom, k=1)  # row r suppresses the later columns
        for r in range(len(suppresses)):
            if not removed[start + r]:
                keep.append(start + r)
                removed[start:] |= suppresses[r]
    return order[np.asarray(keep, dtype=np.int64)]


def _nms_per_group(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`nms` within each group (``groups`` ascending); indices kept, group by group, best first."""
    starts = np.flatnonzero(np.diff(groups, prepend=-1))
    ends = np.append(starts[1:], len(groups))
    kept = [start + nms(boxes[start:end], scores[start:end], threshold) for start, end in zip(starts, ends)]
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


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


def _area_resize(image: np.ndarray, values: np.ndarray, dst: np.ndarray) -> None:
    """``cv2.resize(image, INTER_AREA)`` of ``image`` (h,w,3) uint8 to the size of ``dst`` (H,W,3)
    float32, written into ``dst`` as the same whole numbers; ``values``: ``image`` as float32.

    Shrinking by a ratio that is not whole on both axes, cv2 sums uint8 pixels as floats and rounds
    (half to even) at the end; it does the same sums 15-20% faster on the float32 ``values``, which
    ``np.rint`` then rounds to the same numbers (and the networks take float32 anyway). Whole ratios
    on both axes (cv2's integer block averages, rounding halves up) and enlargements (fixed-point
    interpolation) resize ``image`` itself.
    """
    (out_h, out_w), (in_h, in_w) = dst.shape[:2], image.shape[:2]
    whole_ratios = in_w % out_w == 0 and in_h % out_h == 0
    if in_w < out_w or in_h < out_h or whole_ratios:
        dst[...] = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return
    cv2.resize(values, (out_w, out_h), dst=dst, interpolation=cv2.INTER_AREA)
    np.rint(dst, out=dst)


def _crops(image: np.ndarray, values: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Boxes (N,4) (1-based inclusive, truncated to integers) cut out of ``image`` (uint8; ``values``:
    the same as float32), zero-padding what lies outside, resized to ``size`` by area averaging;
    returns (N, size, size, 3) float32 holding the uint8 results of ``cv2.resize`` (see :func:`_area_resize`).

    Boxes inside the image are resized straight from a view of it; only boxes that cross its border
    are copied into a padded patch first. (One ``cv2.resize`` per box: a vectorised area resampler
    over all boxes through a summed-area table was measured 4-8x slower on the CPU.) The boxes are
    shared out by area among :func:`_thread_count` threads.
    """
    out = torch.zeros(len(boxes), size, size, 3).numpy()  # torch's allocation: aligned for its kernels
    corners = np.fix(boxes).astype(np.int64)
    # cost of a box ~ its area (cv2 reads every pixel) plus a fixed cost per call
    cost = np.cumsum(np.clip(corners[:, 2] - corners[:, 0], 0, None) * np.clip(corners[:, 3] - corners[:, 1], 0, None) + 2000)
    parts = _thread_count()
    bounds = np.searchsorted(cost, cost[-1] * np.arange(1, parts) / parts) if len(cost) else []
    starts, ends = [0, *bounds], [*bounds, len(boxes)]
    _run_in_threads(lambda part: _crop_into(image, values, corners[part], out[part]),
                    [slice(a, b) for a, b in zip(starts, ends) if b > a])
    return out


def _crop_into(image: np.ndarray, values: np.ndarray, corners: np.ndarray, out: np.ndarray) -> None:
    """:func:`_crops` of integer ``corners`` (N,4) written into ``out`` (N, size, size, 3) float32,
    zeros left where a box is empty or wholly outside the image."""
    height, width = image.shape[:2]
    for i, (x1, y1, x2, y2) in enumerate(corners):
        sx1, sy1, sx2, sy2 = max(x1 - 1, 0), max(y1 - 1, 0), min(x2, width), min(y2, height)
        if x2 < x1 or y2 < y1 or sx2 <= sx1 or sy2 <= sy1:  # empty box, or wholly outside: zeros
            continue
        if x1 >= 1 and y1 >= 1 and x2 <= width and y2 <= height:
            _area_resize(image[y1 - 1:y2, x1 - 1:x2], values[y1 - 1:y2, x1 - 1:x2], out[i])
            continue
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.uint8)
        patch[sy1 - (y1 - 1):sy2 - (y1 - 1), sx1 - (x1 - 1):sx2 - (x1 - 1)] = image[sy1:sy2, sx1:sx2]
        _area_resize(patch, patch.astype(np.float32), out[i])


# ----------------------------------------------------------------------------- cv2 work in threads
_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None  # (owning process id, pool)


def _thread_count() -> int:
    """Threads for the detector's cv2 resizing: torch's intra-op thread count, the CPU budget the
    caller gave the networks (1 thread keeps everything in the calling thread)."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _run_in_threads(work: Callable[[_T], None], parts: Sequence[_T]) -> None:
    """``work(part)`` for every part: the first in this thread, the others at once in pool threads.

    The work is cv2 resizing, which releases the GIL, so the parts run in parallel. The pool is
    made again in a forked child process, where the parent's pool threads do not exist.
    """
    global _EXECUTOR
    if len(parts) > 1 and (_EXECUTOR is None or _EXECUTOR[0] != os.getpid()):
        _EXECUTOR = (os.getpid(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mtcnn-cv2"))
    futures = [_EXECUTOR[1].submit(work, part) for part in parts[1:]]
    for part in parts[:1]:
        work(part)
    for future in futures:
        future.result()


def _share_out(items: Sequence[_T], costs: Sequence[float], parts: int) -> list[list[_T]]:
    """``items`` in at most ``parts`` non-empty groups of similar total cost (largest first, each to
    the group with the least cost so far)."""
    groups: list[list[_T]] = [[] for _ in range(max(1, parts))]
    loads = [0.0] * len(groups)
    for i in sorted(range(len(items)), key=lambda i: -costs[i]):
        least = loads.index(min(loads))
        groups[least].append(items[i])
        loads[least] += costs[i]
    return [g for g in groups if g]


#: the MTCNN weights expect (pixel - 127.5) * 0.0078125, i.e. about [-1, 1]
_PIXEL_MEAN, _PIXEL_SCALE = 127.5, 0.0078125


@torch.no_grad()
def _fold_pixel_normalisation(conv: nn.Conv2d) -> None:
    """Make ``conv`` (the first layer, no padding) take raw pixel values in [0, 255]: it computes
    ``conv((x - mean) * scale)`` from ``x`` itself, saving two passes over every input."""
    conv.bias -= _PIXEL_MEAN * _PIXEL_SCALE * conv.weight.sum(dim=(1, 2, 3))
    conv.weight *= _PIXEL_SCALE


# ----------------------------------------------------------------------------- MTCNN pyramid
@dataclass(frozen=True)
class _Level:
    """One image-pyramid level: its scale, size and place (even top-left corner) in the packed canvas."""

    scale: float
    height: int
    width: int
    top: int
    left: int

    @property
    def cells(self) -> tuple[int, int]:
        """P-Net output rows and columns of this level (ceil-mode pooling of the level alone)."""
        return -(-(self.height - 2) // 2) - 4, -(-(self.width - 2) // 2) - 4


def _pyramid_scales(height: int, width: int, min_face_size: float, factor: float, skip_below: float = 0.0) -> list[float]:
    """P-Net scales from the one that maps ``min_face_size`` px onto its 12 px window down to the one
    where the shorter image side is 12 px (the published MTCNN sequence), without the levels that
    look for faces smaller than ``skip_below`` px (the others keep their exact scales)."""
    scales = []
    scale = 12 / min_face_size
    side = min(height, width) * scale
    while side >= 12:
        if 12 / scale >= skip_below:
            scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _pack_levels(height: int, width: int, scales: Sequence[float]) -> tuple[list[_Level], tuple[int, int]]:
    """Place the pyramid levels (largest first) in rows of one canvas, first fit, at even offsets.

    Returns the levels and the canvas size (even). Each level owns ``height + height % 2`` rows and
    ``width + width % 2`` columns, so its 2x2 pooling windows line up with the canvas's.
    """
    sizes = [(int(np.ceil(height * s)), int(np.ceil(width * s))) for s in scales]
    canvas_w = sizes[0][1] + sizes[0][1] % 2
    rows: list[list[int]] = []  # [top, height, used width]
    levels = []
    for scale, (h, w) in zip(scales, sizes):
        need_h, need_w = h + h % 2, w + w % 2
        row = next((r for r in rows if r[2] + need_w <= canvas_w and need_h <= r[1]), None)
        if row is None:
            row = [rows[-1][0] + rows[-1][1] if rows else 0, need_h, 0]
            rows.append(row)
        levels.append(_Level(scale, h, w, row[0], row[2]))
        row[2] += need_w
    return levels, (rows[-1][0] + rows[-1][1], canvas_w)


def _level_edges(levels: Sequence[_Level]) -> list[tuple[slice, slice]]:
    """First-feature-map rows/columns that read past an odd-sized level's edge (see :meth:`_PNet.forward`)."""
    blocked = []
    for lv in levels:
        if lv.width % 2:
            blocked.append((slice(lv.top, lv.top + lv.height - 1), slice(lv.left + lv.width - 2, lv.left + lv.width - 1)))
        if lv.height % 2:
            blocked.append((slice(lv.top + lv.height - 2, lv.top + lv.height - 1), slice(lv.left, lv.left + lv.width - 1)))
    return blocked


def _draw_levels(image: np.ndarray, values: np.ndarray, levels: Sequence[_Level], canvas: np.ndarray) -> None:
    """Each level area-resized (``cv2.INTER_AREA``, see :func:`_area_resize`) from ``image`` (uint8;
    ``values``: the same as float32) into its place in ``canvas`` (H, W, 3) float32, the levels
    shared out among :func:`_thread_count` threads.

    (Every level is resized from the photo itself, as published: resizing the later levels from the
    first one, ~2x cheaper, moved P-Net's proposals enough to shift landmarks by up to 3.8 px.)
    """
    def resize(part: list[_Level]) -> None:
        for lv in part:
            _area_resize(image, values, canvas[lv.top:lv.top + lv.height, lv.left:lv.left + lv.width])

    # cv2's area resize reads its whole source for every level: cost ~ photo size + level size
    costs = [image.shape[0] * image.shape[1] + lv.height * lv.width for lv in levels]
    _run_in_threads(resize, _share_out(levels, costs, _thread_count()))


# ----------------------------------------------------------------------------- landmark plausibility
@dataclass(frozen=True)
class FaceShape:
    """Limits on the layout of a face's five landmarks, in the face's own frame.

    The frame: x along the eye line (left eye -> right eye), y across it towards the mouth, so the
    measures do not change when the face is turned in the image plane. Lengths are fractions of the
    box size ``sqrt(w * h)``, which turning the head left or right shrinks far less than the eye
    distance. A detection passes when every measure lies within its limits:

    * ``eye_distance``: eye distance / box size (frontal ~0.41; shrinks as cos(yaw));
    * ``mouth_height``: distance from the eye line to the mouth centre / box size (frontal ~0.42;
      shrinks as cos(pitch)). Negative means the mouth is on the wrong side of the eyes;
    * ``nose_height``: where the nose lies between the eye line (0) and the mouth centre (1);
    * ``mouth_offset``, ``nose_offset``: distance of the mouth centre / nose from the eyes'
      perpendicular bisector / box size (symmetry; a turned head moves the nose most);
    * ``mouth_width``: mouth-corner distance / eye distance; negative means the corners are in the
      opposite left-right order to the eyes;
    * ``mouth_tilt``: angle (degrees) between the mouth-corner line and the eye line.
    """

    eye_distance: tuple[float, float]
    mouth_height: tuple[float, float]
    nose_height: tuple[float, float]
    mouth_offset: float
    nose_offset: float
    mouth_width: tuple[float, float]
    mouth_tilt: float


#: Any face MTCNN returns. Measured on 220 detections of real faces (the shared photos turned,
#: flipped and scaled, aligned, grey and masked faces, skimage's astronaut, cameraman (3/4 view) and
#: LFW faces): eye distance 0.27-0.46, mouth height 0.35-0.52, nose height 0.29-0.78, offsets <= 0.05
#: and 0.16, mouth width 0.66-1.15, tilt <= 5 deg. These limits leave wide margins for poses
#: outside that set; they reject scrambled or collapsed landmarks.
PLAUSIBLE_FACE = FaceShape(eye_distance=(0.15, 0.75), mouth_height=(0.25, 0.8), nose_height=(0.15, 0.9),
                           mouth_offset=0.08, nose_offset=0.3, mouth_width=(0.3, 2.0), mouth_tilt=25.0)
#: Required when O-Net is unsure (score below ``MTCNNDetector.sure_score``): non-faces that O-Net
#: scores 0.7-0.97 (hands, folds of clothing, textures) get landmarks that are roughly face-like
#: but off in height or symmetry, while real faces score above 0.95 in 98% of the measured cases.
TYPICAL_FACE = FaceShape(eye_distance=(0.15, 0.75), mouth_height=(0.3, 0.6), nose_height=(0.25, 0.85),
                         mouth_offset=0.06, nose_offset=0.2, mouth_width=(0.5, 1.5), mouth_tilt=15.0)


def landmark_layout(boxes: np.ndarray, points: np.ndarray) -> dict[str, np.ndarray]:
    """The :class:`FaceShape` measures of faces with ``boxes`` (N,4) and ``points`` (N,5,2)
    (left eye, right eye, nose, left and right mouth corner); each (N,) float."""
    boxes, points = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(points, np.float64).reshape(-1, 5, 2)
    box_size = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 1e-6, None) * np.clip(boxes[:, 3] - boxes[:, 1], 1e-6, None))
    left_eye, right_eye, nose, mouth_l, mouth_r = (points[:, i] for i in range(5))
    eye_vec = right_eye - left_eye
    eye_dist = np.maximum(np.linalg.norm(eye_vec, axis=1), 1e-6)
    along = eye_vec / eye_dist[:, None]
    across = np.stack([-along[:, 1], along[:, 0]], 1)  # 90 deg clockwise in image coordinates (y down)
    eye_centre = (left_eye + right_eye) / 2
    mouth = (mouth_l + mouth_r) / 2 - eye_centre
    nose = nose - eye_centre
    corners = mouth_r - mouth_l
    mouth_height = np.einsum("nk,nk->n", mouth, across)
    corners_along, corners_across = np.einsum("nk,nk->n", corners, along), np.einsum("nk,nk->n", corners, across)
    return {
        "eye_distance": eye_dist / box_size,
        "mouth_height": mouth_height / box_size,
        "nose_height": np.einsum("nk,nk->n", nose, across) / np.where(np.abs(mouth_height) > 1e-6, mouth_height, 1e-6),
        "mouth_offset": np.abs(np.einsum("nk,nk->n", mouth, along)) / box_size,
        "nose_offset": np.abs(np.einsum("nk,nk->n", nose, along)) / box_size,
        "mouth_width": corners_along / eye_dist,
        "mouth_tilt": np.degrees(np.abs(np.arctan2(corners_across, corners_along))),
    }


def face_like_landmarks(boxes: np.ndarray, points: np.ndarray, shape: FaceShape = PLAUSIBLE_FACE) -> np.ndarray:
    """(N,) bool: which faces (``boxes`` (N,4), ``points`` (N,5,2) in image pixels) have their five
    landmarks arranged within ``shape``'s limits."""
    m = landmark_layout(boxes, points)
    ok = np.ones(len(m["eye_distance"]), bool)
    for name in ("eye_distance", "mouth_height", "nose_height", "mouth_width"):
        low, high = getattr(shape, name)
        ok &= (m[name] >= low) & (m[name] <= high)
    for name in ("mouth_offset", "nose_offset", "mouth_tilt"):
        ok &= m[name] <= getattr(shape, name)
    return ok


class MTCNNDetector:
    """MTCNN cascade: P-Net proposals on an image pyramid, R-Net and O-Net refinement.

    ``weights_dir``: ``None`` (default) for the weights shipped in this package, or a folder with
    ``pnet``, ``rnet`` and ``onet`` ``.safetensors`` (or facenet-pytorch's ``.pt``) files.
    ``min_face_size``: side in pixels of the smallest face searched (default 20, the published
    value). It fixes the pyramid: the first level maps it onto P-Net's 12 px window, each further
    level shrinks by 0.709 (so searches faces 1.41x larger) until the shorter side is 12 px.
    ``skip_faces_below``: do not run the levels that search faces smaller than this many pixels; the
    remaining levels keep their exact scales, so larger faces come out as without it. The first
    levels cost most (level k has 0.5^k of the first level's pixels). The default 24 drops the 20 px
    level, about half of P-Net's work and a third of the detector's time, and on the shared test
    photos gives the same detections as the full pyramid. It is the default because this package
    detects faces to restore them at 512 px: a face below ~24 px (eyes ~10 px apart) holds too
    little detail for that, and its "restoration" would be invented. ``skip_faces_below=0``
    searches every size, as published (e.g. to count or blur small faces). Changing
    ``min_face_size`` instead moves every level's scale, and MTCNN's landmarks then shift by 1-4 px.
    ``thresholds``: face-probability cut-offs of the three stages.
    ``max_side``: larger photos are detected on a downscaled copy (see :func:`detect_downscaled`);
    None disables it (face sizes above are in the pixels of the copy searched). ``check_landmarks``:
    drop detections whose five landmarks are not laid out like a face's: every detection must fit
    :data:`PLAUSIBLE_FACE`, and one that O-Net scores below :attr:`sure_score` must also fit
    :data:`TYPICAL_FACE` (see :func:`face_like_landmarks`). This removes e.g. a hand that O-Net
    scored as a face.

    Speed: the pyramid levels are packed into one canvas that P-Net sees in a single call (channels-
    last, its 2x2 pooling as two elementwise maxima), R-Net and O-Net take all crops of an image in
    one batch (their 3x3 pooling as strided maxima too), pixel normalisation is folded into the first
    convolutions, and results reach the host once per stage. The cv2 resizing (pyramid levels,
    crops: a third of the time) reads a float32 copy of the photo where that gives cv2's uint8
    results (:func:`_area_resize`) and is shared among ``torch.get_num_threads()`` threads. With
    ``skip_faces_below=0`` detections equal the published cascade's (one P-Net call per level, NCHW,
    host round trips per level) up to float rounding: see ``benchmarks/bench_detection.py``.
    """

    pyramid_factor = 0.709  # published MTCNN scale step between pyramid levels
    sure_score = 0.95  # O-Net scores below this must also show a TYPICAL_FACE landmark layout

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        max_side: int | None = 2048,
        check_landmarks: bool = True,
        skip_faces_below: float = 24.0,
    ) -> None:
        if not min_face_size > 0:
            raise ValueError(f"min_face_size must be a positive number of pixels, got {min_face_size}")
        if len(thresholds) != 3 or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P-Net, R-Net, O-Net), got {thresholds}")
        states = load_mtcnn_weights(weights_dir)
        self.device = torch.device(device)
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = max_side
        self.check_landmarks = check_landmarks
        self.skip_faces_below = float(skip_faces_below)
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            try:
                net.load_state_dict(states[name], strict=True)
            except RuntimeError as err:  # wrong layout or shapes
                where = weights_dir if weights_dir is not None else "the package"
                raise DetectorWeightsError(f"{name} weights from {where} do not fit MTCNN's {name}: {err}") from err
            _fold_pixel_normalisation(net.conv1)
            # channels-last: 3x faster convolutions for these narrow layers on the CPU
            net.requires_grad_(False).to(self.device, memory_format=torch.channels_last).eval()

    def _pyramid(self, image: np.ndarray, values: np.ndarray) -> tuple[list[_Level], torch.Tensor, torch.Tensor]:
        """P-Net on every pyramid level of ``image`` (uint8; ``values``: the same as float32) in one
        call: the levels, and P-Net's face probability (H', W') and box offsets (4, H', W') over the
        packed canvas of levels."""
        height, width = image.shape[:2]
        scales = _pyramid_scales(height, width, self.min_face_size, self.pyramid_factor, self.skip_faces_below)
        if not scales:
            return [], torch.zeros(0, 0), torch.zeros(4, 0, 0)
        levels, (canvas_h, canvas_w) = _pack_levels(height, width, scales)
        canvas = torch.zeros(canvas_h, canvas_w, 3)  # torch's allocation: aligned for its kernels
        _draw_levels(image, values, levels, canvas.numpy())
        x = canvas.to(self.device).permute(2, 0, 1)[None]  # channels-last view
        prob, offsets = self.pnet(x, _level_edges(levels))
        return levels, prob[0], offsets[0]

    def _proposals(self, image: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Stage 1: (N, 9) rows ``[x1, y1, x2, y2, score, dx1, dy1, dx2, dy2]``, levels in order."""
        levels, prob, offsets = self._pyramid(image, values)
        if not levels:
            return np.zeros((0, 9))
        owner = np.full(prob.shape, -1, np.int64)  # the level of each P-Net cell of the canvas
        for i, lv in enumerate(levels):
            rows, cols = lv.cells
            owner[lv.top // 2:lv.top // 2 + rows, lv.left // 2:lv.left // 2 + cols] = i
        ys, xs = torch.nonzero(prob >= self.thresholds[0], as_tuple=True)
        found = torch.cat([prob[ys, xs][None], offsets[:, ys, xs], ys[None], xs[None]]).double().cpu().numpy()
        ys, xs = found[5].astype(np.int64), found[6].astype(np.int64)
        level = owner[ys, xs]
        order = np.lexsort((xs, ys, level))  # level by level, row-major: the published order
        order = order[level[order] >= 0]  # cells whose window leaves their level do not count
        found, ys, xs, level = found[:, order], ys[order], xs[order], level[order]
        scale = np.array([lv.scale for lv in levels])[level][:, None]
        grid = np.stack([xs - np.array([lv.left // 2 for lv in levels])[level],
                         ys - np.array([lv.top // 2 for lv in levels])[level]], 1).astype(np.float64)
        rows = np.concatenate([np.floor((2 * grid + 1) / scale), np.floor((2 * grid + 12) / scale), found[:5].T], 1)
        rows = rows[_nms_per_group(rows[:, :4], rows[:, 4], level, 0.5)]
        return rows[nms(rows[:, :4], rows[:, 4], 0.7)]

    def _stage(self, net: nn.Module, image: np.ndarray, values: np.ndarray, boxes: np.ndarray,
               size: int) -> list[np.ndarray]:
        """Run R-Net or O-Net on the crops of all ``boxes`` at once; outputs as float64 arrays."""
        crops = torch.from_numpy(_crops(image, values, boxes, size)).to(self.device).permute(0, 3, 1, 2)
        return [t.double().cpu().numpy() for t in net(crops)]

    @torch.inference_mode()
    def _detect_full(self, image: np.ndarray) -> list[Face]:
        values = image.astype(np.float32)  # what cv2 resizes fastest (see _area_resize)
        rows = self._proposals(image, values)
        if len(rows) == 0:
            return []
        boxes = _square(_regress(rows[:, :4], rows[:, 5:9], inclusive=False))

        prob, offsets = self._stage(self.rnet, image, values, boxes, 24)
        keep = prob > self.thresholds[1]
        boxes, prob, offsets = boxes[keep], prob[keep], offsets[keep]
        if len(boxes) == 0:
            return []
        keep = nms(boxes, prob, 0.7)
        boxes = _square(_regress(boxes[keep], offsets[keep]))

        prob, offsets, marks = self._stage(self.onet, image, values, boxes, 48)
        keep = prob > self.thresholds[2]
        boxes, prob, offsets, marks = boxes[keep], prob[keep], offsets[keep], marks[keep]
        size_x = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        size_y = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        # the cascade works in 1-based pixel indices: subtract 1 for 0-based image coordinates
        points = np.stack([boxes[:, :1] + marks[:, :5] * size_x, boxes[:, 1:2] + marks[:, 5:] * size_y], 2) - 1
        boxes = _regress(boxes, offsets) - 1
        if self.check_landmarks:
            unsure = prob < self.sure_score
            keep = face_like_landmarks(boxes, points, PLAUSIBLE_FACE)
            keep[unsure] &= face_like_landmarks(boxes[unsure], points[unsure], TYPICAL_FACE)
            boxes, prob, points = boxes[keep], prob[keep], points[keep]
        keep = nms(boxes, prob, 0.7, mode="min")
        faces = [Face(boxes[i], points[i], float(prob[i])) for i in keep]
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

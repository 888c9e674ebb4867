"""The MTCNN cascade computed the published way, as the baseline of the fast detector.

One P-Net call per pyramid level on that level's own image, results copied to the host and
suppressed level by level, then one zero-padded crop and one ``cv2.resize(INTER_AREA)`` per box for
R-Net and O-Net, and the networks' layers as published (ceil-mode ``max_pool2d``, NCHW tensors).
This is the library's detector as it was before the batched pyramid (same weights, same numbers up
to float rounding), kept here only to check and time the fast path against it
(``tests/inference/test_inference_detection.py``, ``benchmarks/bench_detection.py``). Not part of
the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from codeformer_lightning.inference.detection import (
    Face,
    MTCNNDetector,
    _ONet,
    _PNet,
    _regress,
    _RNet,
    _square,
    load_mtcnn_weights,
    nms,
)


def _prelu(x: torch.Tensor, prelu: torch.nn.PReLU) -> torch.Tensor:
    return F.prelu(x, prelu.weight)


def _pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    return F.max_pool2d(x, kernel, 2, ceil_mode=True)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).flatten(1)


def pnet(net, x):
    x = _pool(_prelu(net.conv1(x), net.prelu1), 2)
    x = _prelu(net.conv3(_prelu(net.conv2(x), net.prelu2)), net.prelu3)
    return F.softmax(net.conv4_1(x), dim=1)[:, 1], net.conv4_2(x)


def rnet(net, x):
    x = _pool(_prelu(net.conv1(x), net.prelu1), 3)
    x = _pool(_prelu(net.conv2(x), net.prelu2), 3)
    x = _prelu(net.dense4(_flatten_transposed(_prelu(net.conv3(x), net.prelu3))), net.prelu4)
    return F.softmax(net.dense5_1(x), dim=1)[:, 1], net.dense5_2(x)


def onet(net, x):
    x = _pool(_prelu(net.conv1(x), net.prelu1), 3)
    x = _pool(_prelu(net.conv2(x), net.prelu2), 3)
    x = _pool(_prelu(net.conv3(x), net.prelu3), 2)
    x = _prelu(net.dense5(_flatten_transposed(_prelu(net.conv4(x), net.prelu4))), net.prelu5)
    return F.softmax(net.dense6_1(x), dim=1)[:, 1], net.dense6_2(x), net.dense6_3(x)


def crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Boxes (N,4) (1-based inclusive, truncated to integers) cut out of ``image`` with zero padding
    and resized to ``size``: (N, size, size, 3) uint8."""
    import cv2

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


def _to_tensor(images: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float in about [-1, 1]; NCHW memory unless ``channels_last``
    (the permuted view of the NHWC pixels, on which torch's convolutions run channels-last)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = x.float() if channels_last else x.contiguous().float()
    return (x - 127.5) * 0.0078125


class ReferenceMTCNN:
    """The published-style cascade with a detector's weights and settings (min_face_size, thresholds);
    no landmark check and no downscaling of huge photos. Networks in the default (NCHW) layout, or
    with ``channels_last`` on the permuted view of the pixels: the library's detector as issue 16
    found it (wave 1, commit d540efd: the same cascade, 1.6x faster than NCHW on the CPU)."""

    def __init__(self, det: MTCNNDetector, weights_dir=None, channels_last: bool = False) -> None:
        self.channels_last = channels_last
        states = load_mtcnn_weights(weights_dir)
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict(states[name])
            net.eval()
        self.min_face_size, self.thresholds, self.pyramid_factor = det.min_face_size, det.thresholds, det.pyramid_factor

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces of ``image`` (H,W,3) uint8 RGB, best score first."""
        return detect(self, image)


def proposals(det: ReferenceMTCNN, image: np.ndarray) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    cell, stride = 12, 2
    scale = cell / det.min_face_size
    side = min(height, width) * scale
    found = []
    while side >= cell:
        h, w = int(np.ceil(height * scale)), int(np.ceil(width * scale))
        level = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        prob, offsets = pnet(det.pnet, _to_tensor(level[None], det.channels_last))
        prob, offsets = prob[0].numpy(), offsets[0].numpy()
        ys, xs = np.nonzero(prob >= det.thresholds[0])
        if len(ys):
            grid = np.stack([xs, ys], 1).astype(np.float64)
            top_left = np.floor((stride * grid + 1) / scale)
            bottom_right = np.floor((stride * grid + cell) / scale)
            rows = np.concatenate([top_left, bottom_right, prob[ys, xs][:, None], offsets[:, ys, xs].T], 1)
            found.append(rows[nms(rows[:, :4], rows[:, 4], 0.5)])
        scale *= det.pyramid_factor
        side *= det.pyramid_factor
    if not found:
        return np.zeros((0, 9))
    rows = np.concatenate(found)
    return rows[nms(rows[:, :4], rows[:, 4], 0.7)]


@torch.inference_mode()
def detect(det: ReferenceMTCNN, image: np.ndarray) -> list[Face]:
    rows = proposals(det, image)
    if len(rows) == 0:
        return []
    boxes = _square(_regress(rows[:, :4], rows[:, 5:9], inclusive=False))
    prob, offsets = (t.numpy() for t in rnet(det.rnet, _to_tensor(crops(image, boxes, 24), det.channels_last)))
    keep = prob > det.thresholds[1]
    boxes, prob, offsets = boxes[keep], prob[keep], offsets[keep]
    if len(boxes) == 0:
        return []
    keep = nms(boxes, prob, 0.7)
    boxes = _square(_regress(boxes[keep], offsets[keep]))
    prob, offsets, marks = (t.numpy() for t in onet(det.onet, _to_tensor(crops(image, boxes, 48), det.channels_last)))
    keep = prob > det.thresholds[2]
    boxes, prob, offsets, marks = boxes[keep], prob[keep], offsets[keep], marks[keep]
    if len(boxes) == 0:
        return []
    size_x = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    size_y = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    points = np.stack([boxes[:, :1] + marks[:, :5] * size_x, boxes[:, 1:2] + marks[:, 5:] * size_y], 2) - 1
    boxes = _regress(boxes, offsets) - 1
    keep = nms(boxes, prob, 0.7, mode="min")
    faces = [Face(boxes[i].astype(np.float64), points[i].astype(np.float64), float(prob[i])) for i in keep]
    return sorted(faces, key=lambda f: -f.score)

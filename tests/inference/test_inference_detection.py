"""MTCNN: shipped weights, the batched cascade against the published-style one, the landmark check,
real photos against their labelled faces, landmark accuracy, error paths; RetinaFace's layout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from inference_helpers import shared_folder
from mtcnn_reference import ReferenceMTCNN, crops, pnet

from codeformer_lightning.inference import detection
from codeformer_lightning.inference.align import FFHQ_TEMPLATE_512
from codeformer_lightning.inference.detection import (
    PLAUSIBLE_FACE,
    TYPICAL_FACE,
    DetectorWeightsError,
    Face,
    MTCNNDetector,
    RetinaFaceDetector,
    detect_downscaled,
    face_like_landmarks,
    load_mtcnn_weights,
    nms,
)
from codeformer_lightning.io import read_image

TRUTH = json.loads((Path(__file__).parent / "whole_photo_faces.json").read_text())


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


# ----------------------------------------------------------------------------- box helpers
def _greedy_nms(boxes, scores, threshold, mode="union"):
    """The textbook loop: take the best remaining box, drop the ones it overlaps too much."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
    while order:
        best = order.pop(0)
        keep.append(best)
        rest = []
        for j in order:
            a, b = boxes[best], boxes[j]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            denom = min(area(a), area(b)) if mode == "min" else area(a) + area(b) - inter
            if inter / denom <= threshold:
                rest.append(j)
        order = rest
    return keep


def test_nms_keeps_best_and_drops_overlaps(rng):
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 59, 59], [2, 2, 5, 5]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]  # box 1 overlaps box 0 with IoU 0.67
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]  # 3 lies inside 0 and 1
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0
    # many boxes (more than one 512-row block), tied scores: the same boxes as the textbook loop
    xy = rng.uniform(0, 300, (700, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (700, 2))], 1)
    scores = rng.integers(0, 10, 700) / 10.0
    for mode, threshold in (("union", 0.5), ("min", 0.7)):
        assert nms(boxes, scores, threshold, mode).tolist() == _greedy_nms(boxes, scores, threshold, mode)


def test_crops_match_a_padded_copy_and_cv2_resize(rng):
    """The crops hold cv2's uint8 area-resized pixels, whichever way they were computed (float sums,
    whole-ratio block averages, enlargement, mixed)."""
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    boxes = np.array([[5, 4, 30, 29], [-6, -3, 20, 23], [40, 20, 70, 50], [60, 60, 80, 80], [10, 10, 9, 20],
                      [1, 1, 53, 37], [3.7, 2.2, 12.9, 11.5],  # inside, over the corner/edge, outside, empty, small
                      [2, 3, 49, 26], [3, 2, 50, 37], [1, 5, 48, 16]])  # 48x24 (whole ratios), 48x36, 48x12 (mixed)
    out = detection._crops(image, image.astype(np.float32), boxes, 24)
    assert out.shape == (len(boxes), 24, 24, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, crops(image, boxes, 24))
    assert not out[3].any() and not out[4].any()
    x1, y1, x2, y2 = 5, 4, 30, 29  # 1-based inclusive box -> rows 3..28, columns 4..29
    np.testing.assert_array_equal(out[0], cv2.resize(image[y1 - 1:y2, x1 - 1:x2], (24, 24), interpolation=cv2.INTER_AREA))


def test_cv2_work_shared_out_among_threads_gives_the_same_pixels(rng):
    """With 2 torch threads the crops and the pyramid levels are resized in 2 threads: same output."""
    image = rng.integers(0, 256, (61, 87, 3), dtype=np.uint8)
    boxes = np.concatenate([rng.uniform(-10, 50, (40, 2)), rng.uniform(5, 60, (40, 1)).repeat(2, 1)], 1)
    boxes[:, 2:] += boxes[:, :2]
    levels, (height, width) = detection._pack_levels(61, 87, detection._pyramid_scales(61, 87, 12, 0.709))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the autouse fixture restores the count
        canvas = np.zeros((height, width, 3), np.float32)
        detection._draw_levels(image, image.astype(np.float32), levels, canvas)
        results.append((detection._crops(image, image.astype(np.float32), boxes, 24), canvas))
    np.testing.assert_array_equal(results[0][0], crops(image, boxes, 24))
    for lv in levels:  # each level holds cv2's uint8 area resize of the image
        want = cv2.resize(image, (lv.width, lv.height), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(results[0][1][lv.top:lv.top + lv.height, lv.left:lv.left + lv.width], want)
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    assert detection._share_out(list("abcd"), [1, 5, 2, 2], 2) == [["b"], ["c", "d", "a"]]


def test_fast_pooling_and_prelu_equal_torchs(rng):
    """R-Net/O-Net's 3x3 ceil-mode pooling as strided maxima, P-Net's first PReLU over long rows."""
    prelu = torch.nn.PReLU(10)
    prelu.weight.data = torch.from_numpy(rng.uniform(-1.3, 1.1, 10)).float()
    for shape in [(5, 28, 22, 22), (3, 48, 9, 9), (2, 32, 46, 46), (2, 64, 21, 21), (1, 10, 7, 8), (1, 10, 3, 3)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        want = torch.nn.functional.max_pool2d(x, 3, 2, ceil_mode=True)
        assert torch.equal(detection._max_pool_3x3(x), want) and torch.equal(detection._max_pool_3x3(x.contiguous()), want)
        if shape[1] == 10:
            assert torch.equal(detection._prelu_few_channels(x, prelu), prelu(x))
            assert torch.equal(detection._prelu_few_channels(x.contiguous(), prelu), prelu(x))


# ----------------------------------------------------------------------------- weights
def test_shipped_weights_load_from_the_package_and_name_their_source():
    from importlib.resources import files

    from safetensors import safe_open

    states = load_mtcnn_weights()
    assert {k: len(v) for k, v in states.items()} == {"pnet": 13, "rnet": 16, "onet": 21}
    folder = files("codeformer_lightning.inference").joinpath("weights", "mtcnn")
    notice = folder.joinpath("NOTICE.md").read_text()
    assert "MIT License" in notice and "Timothy Esler" in notice and "facenet-pytorch" in notice
    for net in ("pnet", "rnet", "onet"):
        with safe_open(str(folder.joinpath(f"{net}.safetensors")), "pt") as f:
            meta = f.metadata()
        assert meta["source"].endswith(f"facenet_pytorch/data/{net}.pt") and meta["source_sha256"] in notice


def test_shipped_weights_equal_the_facenet_pytorch_files():
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None:
        pytest.skip("facenet-pytorch is not installed (no longer needed): nothing to compare with")
    source = Path(spec.submodule_search_locations[0]) / "data"
    for net, state in load_mtcnn_weights().items():
        original = torch.load(source / f"{net}.pt", weights_only=True)
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)


def test_a_user_folder_of_pt_files_gives_the_same_detector(tmp_path, mtcnn):
    for net, state in load_mtcnn_weights().items():  # facenet-pytorch's layout: pnet.pt, rnet.pt, onet.pt
        torch.save(state, tmp_path / f"{net}.pt")
    from_folder = MTCNNDetector(weights_dir=tmp_path)
    for a, b in zip(from_folder.onet.parameters(), mtcnn.onet.parameters()):
        assert torch.equal(a, b)


def test_missing_or_bad_weights_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DetectorWeightsError, match=r"pnet\.safetensors \(or pnet\.pt\) missing in .*weights_dir=None"):
        MTCNNDetector(weights_dir=tmp_path)
    states = load_mtcnn_weights()
    torch.save(states["pnet"], tmp_path / "pnet.pt")
    torch.save(states["onet"], tmp_path / "rnet.pt")  # the wrong network
    (tmp_path / "onet.safetensors").write_bytes(b"not a weight file")
    with pytest.raises(DetectorWeightsError, match=r"cannot read MTCNN weights from .*onet\.safetensors"):
        MTCNNDetector(weights_dir=tmp_path)
    torch.save(states["onet"], tmp_path / "onet.pt")
    (tmp_path / "onet.safetensors").unlink()
    with pytest.raises(DetectorWeightsError, match=r"rnet weights from .* do not fit MTCNN's rnet"):
        MTCNNDetector(weights_dir=tmp_path)
    # an install that lost its package data says so instead of failing obscurely
    monkeypatch.setattr(detection, "MTCNN_PACKAGE_WEIGHTS", ("weights", "no_such_folder"))
    with pytest.raises(DetectorWeightsError, match=r"missing from the installed codeformer_lightning package"):
        MTCNNDetector()


# ----------------------------------------------------------------------------- fast path = published path
def test_packed_pyramid_gives_every_level_its_own_pnet_output(rng):
    """One P-Net call over the packed canvas equals one call per level, odd level sides included."""
    image = cv2.GaussianBlur(rng.integers(0, 256, (157, 203, 3), dtype=np.uint8), (0, 0), 2)
    every_level = MTCNNDetector(skip_faces_below=0)
    reference = ReferenceMTCNN(every_level)
    with torch.inference_mode():
        levels, prob, offsets = every_level._pyramid(image, image.astype(np.float32))
        assert len(levels) == 6 and any(lv.width % 2 for lv in levels) and any(lv.height % 2 for lv in levels)
        for lv in levels:
            level = cv2.resize(image, (lv.width, lv.height), interpolation=cv2.INTER_AREA)
            x = (torch.from_numpy(level).permute(2, 0, 1)[None].float() - 127.5) * 0.0078125
            want_prob, want_offsets = pnet(reference.pnet, x)
            rows, cols = lv.cells
            assert want_prob.shape[1:] == (rows, cols)
            got = prob[lv.top // 2:lv.top // 2 + rows, lv.left // 2:lv.left // 2 + cols]
            torch.testing.assert_close(got, want_prob[0], atol=2e-5, rtol=0)
            torch.testing.assert_close(offsets[:, lv.top // 2:lv.top // 2 + rows, lv.left // 2:lv.left // 2 + cols],
                                       want_offsets[0], atol=2e-5, rtol=0)


def test_batched_cascade_gives_the_published_cascades_detections(mtcnn):
    photo = read_image(shared_folder("whole") / "00.jpg")  # four faces of 35-45 px: every level matters
    fast = MTCNNDetector(check_landmarks=False, skip_faces_below=0)  # the published computation
    want, got = ReferenceMTCNN(mtcnn).detect(photo), fast.detect(photo)
    assert len(want) == len(got) == 4
    for a, b in zip(want, got):
        assert box_iou(a.box, b.box) > 0.999
        assert np.abs(a.landmarks - b.landmarks).max() < 0.05 and abs(a.score - b.score) < 1e-4


def test_skipping_small_face_levels_keeps_the_other_levels_and_detections(mtcnn):
    """The default skips the 20 px level only; on every shared photo the detections stay those of
    the full published pyramid."""
    assert mtcnn.skip_faces_below == 24
    every_level = MTCNNDetector(skip_faces_below=0)
    for path in sorted(shared_folder("whole").iterdir()):
        photo = read_image(path)
        scales = detection._pyramid_scales(*photo.shape[:2], 20, 0.709)
        assert detection._pyramid_scales(*photo.shape[:2], 20, 0.709, skip_below=24) == scales[1:]
        for a, b in zip(every_level.detect(photo), mtcnn.detect(photo), strict=True):
            assert box_iou(a.box, b.box) > 0.999 and np.abs(a.landmarks - b.landmarks).max() < 0.05


# ----------------------------------------------------------------------------- real photos
def test_real_photos_give_their_labelled_faces_and_nothing_else(mtcnn):
    """Each labelled face found once (IoU > 0.7 with its hand-checked box), no other detection."""
    for path in sorted(shared_folder("whole").iterdir()):
        faces = mtcnn.detect(read_image(path))
        truth = [np.array(b, float) for b in TRUTH[path.name]["faces"]]
        assert len(faces) == len(truth), f"{path.name}: {len(faces)} detections for {len(truth)} faces"
        for box in truth:
            assert max(box_iou(box, f.box) for f in faces) > 0.7, f"{path.name}: face {box.tolist()} missed"
        for face in faces:
            assert face.box.shape == (4,) and face.landmarks.shape == (5, 2) and 0.7 < face.score <= 1.0
            x1, y1, x2, y2 = face.box
            assert (x1 - 2 <= face.landmarks[:, 0]).all() and (face.landmarks[:, 0] <= x2 + 2).all()
            assert (y1 - 2 <= face.landmarks[:, 1]).all() and (face.landmarks[:, 1] <= y2 + 2).all()
            assert face.landmarks[0, 0] < face.landmarks[1, 0]  # left eye left of the right eye
            assert face.landmarks[:2, 1].max() < face.landmarks[3:, 1].min()  # eyes above the mouth
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_landmarks_of_aligned_faces_land_on_the_template():
    """Measured on the 10 shared aligned faces: mean distance to the FFHQ template 9.8 px at 512 px,
    worst face 13.2 px, eyes within 8.1 px (MTCNN's nose and mouth points sit 12-16 px from the
    template's on average: a different labelling convention, not noise)."""
    detector = MTCNNDetector(min_face_size=120)  # aligned faces are ~250 px wide: skip the small-face levels
    errors = []
    for path in sorted(shared_folder("aligned").iterdir()):
        faces = detector.detect(read_image(path))
        assert faces, f"no face found in aligned face {path}"
        best = max(faces, key=lambda f: f.size)
        errors.append(np.linalg.norm(best.landmarks - FFHQ_TEMPLATE_512, axis=1))
    errors = np.array(errors)
    print("landmark distance to the template, px (faces x points):", np.round(errors, 1))
    assert errors.mean() < 12 and errors.mean(1).max() < 16 and errors[:, :2].max() < 10


def test_no_faces_in_flat_noise_and_tiny_images(mtcnn):
    assert mtcnn.detect(np.full((64, 64, 3), 128, np.uint8)) == []
    assert mtcnn.detect(np.zeros((8, 8, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        mtcnn.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="min_face_size"):
        MTCNNDetector(min_face_size=0)


def test_huge_image_is_detected_on_a_downscaled_copy():
    """A face in a big canvas is found through the downscaled copy, at the right full-size place."""
    path = shared_folder("whole") / "03.jpg"
    photo = read_image(path)
    canvas = np.full((2400, 3000, 3), 90, np.uint8)
    canvas[1000:1000 + photo.shape[0] * 3, 1500:1500 + photo.shape[1] * 3] = cv2.resize(
        photo, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    calls = []

    def fake_detect(image):
        calls.append(image.shape)
        # a face at known coordinates of whatever it is given
        return [Face(np.array([10.0, 20.0, 30.0, 40.0]), np.full((5, 2), 25.0), 0.9)]

    (face,) = detect_downscaled(fake_detect, canvas, 600)
    assert max(calls[0][:2]) == 600
    factor = canvas.shape[1] / 600
    np.testing.assert_allclose(face.box, np.array([10, 20, 30, 40]) * factor + 0.5 * (factor - 1), atol=1e-6)
    detector = MTCNNDetector(max_side=1000)
    faces = detector.detect(canvas)
    assert faces, "face lost in the downscaled copy"
    cx, cy = (faces[0].box[:2] + faces[0].box[2:]) / 2
    assert 1500 < cx < 1500 + photo.shape[1] * 3 and 1000 < cy < 1000 + photo.shape[0] * 3


# ----------------------------------------------------------------------------- landmark check
FACE_BOX = np.array([0.0, 0.0, 100.0, 120.0])
#: a frontal face in that box: eyes 40 px apart, nose below their middle, mouth below the nose
FRONTAL = np.array([[30.0, 50.0], [70.0, 50.0], [50.0, 72.0], [35.0, 95.0], [65.0, 95.0]])


def _turned(points: np.ndarray, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (points - [50, 60]) @ rot.T + [50, 60]


@pytest.mark.parametrize("name, points", [
    ("eyes below the mouth", FRONTAL[[3, 4, 2, 0, 1]]),
    ("mouth corners in the opposite left-right order to the eyes", FRONTAL[[0, 1, 2, 4, 3]]),
    ("nose outside the eye-mouth band", np.vstack([FRONTAL[:2], [[50, 30]], FRONTAL[3:]])),
    ("all five points on one spot", np.full((5, 2), 50.0)),
    ("eyes 4 px apart in a 110 px box", np.vstack([[[48, 50], [52, 50]], FRONTAL[2:]])),
    ("mouth far off the eyes' axis", FRONTAL + [[0, 0], [0, 0], [0, 0], [25, 0], [25, 0]]),
    ("mouth line 40 deg off the eye line", np.vstack([FRONTAL[:3], [[35, 85], [65, 110]]])),
])
def test_scrambled_landmarks_are_not_face_like(name, points):
    assert not face_like_landmarks(FACE_BOX[None], points[None], PLAUSIBLE_FACE)[0], name


def test_face_like_landmarks_pass_in_any_in_plane_turn():
    for degrees in (-60, -30, 0, 15, 45, 90, 180):
        points = _turned(FRONTAL, degrees)
        assert face_like_landmarks(FACE_BOX[None], points[None], PLAUSIBLE_FACE)[0], degrees
        assert face_like_landmarks(FACE_BOX[None], points[None], TYPICAL_FACE)[0], degrees
    # the FFHQ template in the box of an aligned 512 px face
    assert face_like_landmarks(np.array([[120.0, 130.0, 392.0, 430.0]]), FFHQ_TEMPLATE_512[None], TYPICAL_FACE)[0]


def test_a_hand_scored_as_a_face_is_dropped_and_real_faces_kept():
    """02.png: at an O-Net threshold of 0.6 MTCNN also reports the hand on the left man's shoulder
    (score 0.68): its 'mouth' sits 0.08 box sizes off the eyes' axis, real faces' at most 0.01."""
    photo = read_image(shared_folder("whole") / "02.png")
    loose = dict(thresholds=(0.6, 0.7, 0.6))
    unchecked = MTCNNDetector(check_landmarks=False, **loose).detect(photo)
    checked = MTCNNDetector(**loose).detect(photo)
    hands = [f for f in unchecked if box_iou(f.box, np.array([6.0, 194.0, 79.0, 283.0])) > 0.8]
    assert len(hands) == 1 and hands[0].score < MTCNNDetector.sure_score
    assert len(unchecked) == 5 and len(checked) == 4
    assert all(max(box_iou(np.array(b, float), f.box) for f in checked) > 0.7 for b in TRUTH["02.png"]["faces"])
    boxes, points = np.stack([f.box for f in checked]), np.stack([f.landmarks for f in checked])
    assert face_like_landmarks(boxes, points, TYPICAL_FACE).all()


# ----------------------------------------------------------------------------- RetinaFace
def test_retinaface_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(DetectorWeightsError, match="detection_Resnet50_Final.pth"):
        RetinaFaceDetector(None)
    with pytest.raises(DetectorWeightsError, match="detection_Resnet50_Final.pth"):
        RetinaFaceDetector(tmp_path / "detection_Resnet50_Final.pth")
    torch.save(load_mtcnn_weights()["pnet"], tmp_path / "pnet.pt")
    with pytest.raises(DetectorWeightsError, match="not a RetinaFace"):
        RetinaFaceDetector(tmp_path / "pnet.pt")


def test_retinaface_network_matches_published_layout_and_decodes(tmp_path):
    """The published file's layout (``module.`` prefix, no BatchNorm counters) loads; anchors and
    decoding give boxes around their anchors (no trained weights are available offline)."""
    from codeformer_lightning.inference.detection import RetinaFaceNet, retinaface_priors

    torch.manual_seed(0)
    net = RetinaFaceNet()
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 27.29) < 0.01  # published model size
    with torch.no_grad():  # a head that only says "face", with zero offsets
        for h in net.ClassHead:
            h.conv1x1.weight.zero_()
            h.conv1x1.bias.copy_(torch.tensor([-10.0, 10.0] * 2))
        for h in (*net.BboxHead, *net.LandmarkHead):
            h.conv1x1.weight.zero_()
            h.conv1x1.bias.zero_()
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "detection_Resnet50_Final.pth")
    detector = RetinaFaceDetector(tmp_path / "detection_Resnet50_Final.pth", nms_threshold=1.0)
    priors = retinaface_priors(64, 96)
    assert priors.shape == (2 * (8 * 12 + 4 * 6 + 2 * 3), 4)
    np.testing.assert_allclose(priors[0], [4 / 96, 4 / 64, 16 / 96, 16 / 64])
    faces = detector.detect(np.zeros((64, 96, 3), np.uint8))
    assert len(faces) == len(priors)
    boxes = np.array(sorted(f.box.tolist() for f in faces))
    expected = np.array(sorted(np.concatenate([(priors[:, :2] - priors[:, 2:] / 2) * [96, 64],
                                               (priors[:, :2] + priors[:, 2:] / 2) * [96, 64]], 1).tolist()))
    np.testing.assert_allclose(boxes, expected, atol=1e-4)
    assert all(np.allclose(f.landmarks, (f.box[:2] + f.box[2:]) / 2) for f in faces)

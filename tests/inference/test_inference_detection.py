"""MTCNN: weights loading, cascade on real photos, landmark accuracy, error paths."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from inference_helpers import shared_folder

from codeformer_lightning.inference.align import FFHQ_TEMPLATE_512
from codeformer_lightning.inference.detection import (
    DetectorWeightsError,
    Face,
    MTCNNDetector,
    RetinaFaceDetector,
    detect_downscaled,
    nms,
)
from codeformer_lightning.io import read_image


def test_nms_keeps_best_and_drops_overlaps():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 59, 59], [2, 2, 5, 5]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]  # box 1 overlaps box 0 with IoU 0.67
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]  # 3 lies inside 0 and 1
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0


def test_real_photos_have_faces(mtcnn):
    counts = {}
    for path in sorted(shared_folder("whole").iterdir()):
        image = read_image(path)
        faces = mtcnn.detect(image)
        counts[path.name] = len(faces)
        assert faces, f"no face found in {path}"
        for face in faces:
            assert face.box.shape == (4,) and face.landmarks.shape == (5, 2) and 0.7 < face.score <= 1.0
            x1, y1, x2, y2 = face.box
            # the landmarks lie inside their box, eyes above the mouth, left eye left of the right eye
            assert (x1 - 2 <= face.landmarks[:, 0]).all() and (face.landmarks[:, 0] <= x2 + 2).all()
            assert (y1 - 2 <= face.landmarks[:, 1]).all() and (face.landmarks[:, 1] <= y2 + 2).all()
            assert face.landmarks[0, 0] < face.landmarks[1, 0]
            assert face.landmarks[:2, 1].max() < face.landmarks[3:, 1].min()
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    print("MTCNN faces per photo:", counts)
    assert sum(counts.values()) >= len(counts)


def test_landmarks_of_aligned_faces_land_on_the_template():
    # aligned 512-px faces are ~250 px wide: skipping the pyramid's small-face levels saves time
    detector = MTCNNDetector(min_face_size=120)
    errors = []
    for path in sorted(shared_folder("aligned").iterdir()):
        faces = detector.detect(read_image(path))
        assert faces, f"no face found in aligned face {path}"
        best = max(faces, key=lambda f: f.size)
        errors.append(np.linalg.norm(best.landmarks - FFHQ_TEMPLATE_512, axis=1).mean() / 512)
    print("mean landmark error / face size:", np.round(errors, 4))
    assert np.mean(errors) < 0.05 and max(errors) < 0.08


def test_no_faces_in_flat_noise_and_tiny_images(mtcnn):
    assert mtcnn.detect(np.full((64, 64, 3), 128, np.uint8)) == []
    assert mtcnn.detect(np.zeros((8, 8, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        mtcnn.detect(np.zeros((64, 64), np.uint8))


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


def test_missing_or_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(DetectorWeightsError, match=r"pnet\.pt.*facenet-pytorch"):
        MTCNNDetector(weights_dir=tmp_path)
    import importlib.util

    source = importlib.util.find_spec("facenet_pytorch").submodule_search_locations[0]
    for name in ("pnet.pt", "rnet.pt"):
        shutil.copy(f"{source}/data/{name}", tmp_path / name)
    (tmp_path / "onet.pt").write_bytes(b"not a weight file")
    with pytest.raises(DetectorWeightsError, match="onet.pt"):
        MTCNNDetector(weights_dir=tmp_path)


def test_retinaface_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(DetectorWeightsError, match="detection_Resnet50_Final.pth"):
        RetinaFaceDetector(None)
    with pytest.raises(DetectorWeightsError, match="detection_Resnet50_Final.pth"):
        RetinaFaceDetector(tmp_path / "detection_Resnet50_Final.pth")
    import importlib.util

    pnet = importlib.util.find_spec("facenet_pytorch").submodule_search_locations[0] + "/data/pnet.pt"
    with pytest.raises(DetectorWeightsError, match="not a RetinaFace"):
        RetinaFaceDetector(pnet)


def test_retinaface_network_matches_published_layout_and_decodes(tmp_path):
    """The published file's layout (``module.`` prefix, no BatchNorm counters) loads; anchors and
    decoding give boxes around their anchors (no trained weights are available offline)."""
    import torch

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

"""Metric values against known numbers and invariants; weight loading and missing-weight messages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import arcface_state, random_faces, write_folder

from codeformer_lightning.evaluation import (
    PSNR_CAP,
    EvaluationConfig,
    IResNet,
    MetricSuite,
    PairingError,
    evaluate_folders,
    landmark_distance,
    load_arcface,
    load_image,
    pair_folders,
    psnr,
    ssim,
)
from codeformer_lightning.evaluation.arcface import aligned_face_crop_box, arcface_input, identity_similarity
from codeformer_lightning.evaluation.metrics import rgb_to_y
from codeformer_lightning.io import BadImageError


def _batch(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack(random_faces(n, size, seed))).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------- PSNR / SSIM
@pytest.mark.parametrize("d", [1 / 255, 0.01, 0.1])
def test_psnr_of_a_constant_offset_is_20_log10_of_1_over_d(d):
    gt = _batch()
    assert torch.allclose(psnr(gt + d, gt), torch.full((3,), 20 * math.log10(1 / d)), atol=1e-4)


def test_psnr_of_identical_images_is_capped_and_finite():
    gt = _batch()
    assert torch.equal(psnr(gt, gt), torch.full((3,), PSNR_CAP))


def test_psnr_y_channel_uses_bt601_luma():
    gt = _batch()
    restored = gt.clone()
    restored[:, 1] += 0.05  # green only: luma moves by 0.05 * 128.553 / 255
    dy = 0.05 * 128.553 / 255
    assert torch.allclose(
        psnr(restored, gt, y_channel=True), torch.full((3,), 20 * math.log10(1 / dy)), atol=1e-4
    )
    assert torch.allclose(rgb_to_y(torch.ones(1, 3, 2, 2)), torch.full((1, 1, 2, 2), 235 / 255))


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    gt = _batch()
    assert torch.allclose(ssim(gt, gt), torch.ones(3), atol=1e-6)
    noisy = (gt + 0.1 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    values = ssim(noisy, gt)
    assert values.shape == (3,) and (values < 0.9).all() and (values > 0).all()
    assert torch.allclose(ssim(gt, gt, y_channel=True), torch.ones(3), atol=1e-6)


# ----------------------------------------------------------------------------- LPIPS
@pytest.mark.filterwarnings("ignore:LPIPS. no linear heads")
def test_lpips_is_zero_for_identical_images_and_positive_otherwise(vgg_file):
    suite = MetricSuite(EvaluationConfig(metrics=["lpips"], vgg_weights=vgg_file))
    assert suite.metrics == ["lpips"] and not suite.unavailable
    gt = _batch(1)
    assert suite._measure(gt, gt)["lpips"] == 0.0
    assert suite._measure((gt + 0.1).clamp(0, 1), gt)["lpips"] > 0


def test_lpips_without_vgg_weights_is_unavailable_with_a_message(tmp_path):
    with pytest.warns(UserWarning, match="lpips unavailable"):
        suite = MetricSuite(EvaluationConfig(metrics=["psnr", "lpips"]))
    assert suite.metrics == ["psnr"]
    msg = suite.unavailable["lpips"]
    assert "vgg16-397923af.pth" in msg and "--vgg-weights" in msg
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["lpips"], vgg_weights=missing))
    assert str(missing) in suite.unavailable["lpips"]


def test_lpips_with_missing_heads_or_a_wrong_file_names_the_file(tmp_path, vgg_file):
    with pytest.warns(UserWarning):
        suite = MetricSuite(
            EvaluationConfig(metrics=["lpips"], vgg_weights=vgg_file, lpips_heads=tmp_path / "heads.pth")
        )
    assert "heads.pth: no such file" in suite.unavailable["lpips"]
    wrong = tmp_path / "arcface.pth"
    torch.save(arcface_state((2, 2, 2, 2)), wrong)
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["lpips"], vgg_weights=wrong))
    assert "arcface.pth" in suite.unavailable["lpips"] and "features.0.weight" in suite.unavailable["lpips"]


# ----------------------------------------------------------------------------- ArcFace identity
def test_arcface_loads_the_published_key_layout_of_every_depth(tmp_path):
    for layers in [(2, 2, 2, 2), (3, 4, 14, 3)]:  # r18, r50
        path = tmp_path / f"r{sum(layers) * 2 + 2}.pth"
        torch.save(arcface_state(layers), path)
        model = load_arcface(path)
        assert isinstance(model, IResNet) and model.layers_config == layers and not model.training


def test_arcface_accepts_module_prefixed_and_state_dict_wrapped_files(tmp_path):
    state = arcface_state((2, 2, 2, 2), seed=3)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_arcface(path)
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])


def test_identity_similarity_of_an_image_with_itself_is_one(arcface_file):
    model = load_arcface(arcface_file)
    faces = _batch(2, 64)
    torch.testing.assert_close(identity_similarity(model, faces, faces), torch.ones(2), atol=1e-5, rtol=0)
    other = identity_similarity(model, faces, faces.flip(0))
    assert (other < 0.9999).all() and (other >= -1).all()
    # sizes may differ between restored and gt: the crop is taken in relative coordinates
    big = torch.nn.functional.interpolate(faces, size=128, mode="bilinear", align_corners=False)
    assert (identity_similarity(model, big, faces) > 0.9).all()


def test_arcface_crop_of_an_aligned_face_maps_the_templates_onto_each_other():
    left, top, side = aligned_face_crop_box()
    ffhq_eye = torch.tensor([192.98138, 239.94708]) / 512
    arc_eye = torch.tensor([38.2946, 51.6963]) / 112
    # the left eye of the FFHQ template lands within a pixel of ArcFace's left eye
    assert torch.allclose((ffhq_eye - torch.tensor([left, top])) / side * 112, arc_eye * 112, atol=1.5)
    # a marker at the FFHQ eye position shows up at the ArcFace eye position of the crop
    image = torch.zeros(1, 3, 512, 512)
    x, y = (ffhq_eye * 512).round().long().tolist()
    image[..., y - 3 : y + 4, x - 3 : x + 4] = 1
    crop = arcface_input(image)
    peak = (crop[0, 0] == crop[0, 0].max()).nonzero().float().mean(0)
    assert torch.allclose(peak.flip(0), arc_eye * 112, atol=2.0)


def test_identity_without_or_with_wrong_weights_is_unavailable_with_a_message(tmp_path):
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["identity", "psnr"]))
    assert "--arcface-weights" in suite.unavailable["identity"] and suite.metrics == ["psnr"]
    wrong = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["identity"], arcface_weights=wrong))
    assert str(wrong) in suite.unavailable["identity"] and "IResNet" in suite.unavailable["identity"]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_arcface(corrupt)


# ----------------------------------------------------------------------------- FID
class MeanColour(torch.nn.Module):
    """A FID feature extractor whose Frechet distance is known in closed form: per-channel means."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_fid_with_a_custom_feature_module_gives_the_closed_form_value(tmp_path):
    gts = random_faces(6, 32, seed=2)
    k = 7  # uint8 offset: every image's mean colour moves by k, covariances stay equal -> FID = 3 k^2
    write_folder(tmp_path / "gt", {f"{i}": g for i, g in enumerate(gts)})
    write_folder(tmp_path / "same", {f"{i}": g for i, g in enumerate(gts)})
    write_folder(tmp_path / "shifted", {f"{i}": g + k for i, g in enumerate(gts)})
    config = EvaluationConfig(metrics=["fid"])
    suite = MetricSuite(config, fid_feature=MeanColour())
    same = evaluate_folders(tmp_path / "same", tmp_path / "gt", suite=suite)
    shifted = evaluate_folders(tmp_path / "shifted", tmp_path / "gt", suite=suite)
    assert abs(same.mean["fid"]) < 1e-3
    assert shifted.mean["fid"] == pytest.approx(3 * k**2, rel=1e-3)
    assert shifted.per_image["0"] == {}  # a set metric: no per-image values


def test_fid_without_weights_or_package_is_unavailable_with_a_message(tmp_path):
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["fid"]))
    assert (
        "--fid-weights" in suite.unavailable["fid"]
        and "weights-inception-2015-12-05" in suite.unavailable["fid"]
    )
    with pytest.warns(UserWarning):
        suite = MetricSuite(EvaluationConfig(metrics=["fid"], fid_weights=tmp_path / "missing.pth"))
    assert "missing.pth: no such file" in suite.unavailable["fid"]
    fake = tmp_path / "inception.pth"
    fake.write_bytes(b"x")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning):
            suite = MetricSuite(EvaluationConfig(metrics=["fid"], fid_weights=fake))
        assert "pip install torch-fidelity" in suite.unavailable["fid"]


def test_fid_of_a_single_pair_is_unavailable_not_a_crash(tmp_path):
    gts = {"a": random_faces(1)[0]}
    write_folder(tmp_path / "gt", gts)
    write_folder(tmp_path / "r", gts)
    result = evaluate_folders(
        tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["psnr", "fid"]), fid_feature=MeanColour()
    )
    assert "at least 2" in result.unavailable["fid"] and result.mean["psnr"] == PSNR_CAP


# ----------------------------------------------------------------------------- landmarks
@dataclass
class _Face:
    box: np.ndarray
    landmarks: np.ndarray


class _ShiftDetector:
    """Finds one face whose landmarks move with the image's mean brightness: a known distance."""

    def detect(self, image: np.ndarray) -> list[_Face]:
        shift = float(image.mean())
        pts = np.array([[10, 10], [20, 10], [15, 15], [11, 20], [19, 20]], float) + shift / 10
        return [_Face(np.array([0.0, 0.0, 25.0, 25.0]), pts)]


def test_landmark_distance_is_mean_point_distance_over_face_size():
    base = np.array([[10, 10], [20, 10], [15, 15], [11, 20], [19, 20]], float)
    gt = [_Face(np.array([0, 0, 40, 10.0]), base)]  # sqrt(40 * 10) = 20 px face
    moved = [_Face(np.array([0, 0, 40, 10.0]), base + [3, 4])]  # every point 5 px away
    assert landmark_distance(moved, gt) == pytest.approx(5 / 20)
    assert landmark_distance(gt, gt) == 0.0
    assert landmark_distance([], gt) is None and landmark_distance(gt, []) is None
    small = _Face(np.array([0, 0, 4, 4.0]), base + 100)  # the largest face is the one compared
    assert landmark_distance(moved + [small], [small] + gt) == pytest.approx(0.25)


def test_landmark_metric_with_an_injected_detector(tmp_path):
    gts = random_faces(2, 32, seed=4)
    write_folder(tmp_path / "gt", {"a": gts[0], "b": gts[1]})
    write_folder(tmp_path / "r", {"a": gts[0], "b": gts[1] + 10})
    result = evaluate_folders(
        tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["landmarks"]), detector=_ShiftDetector()
    )
    assert result.per_image["a"]["landmarks"] == 0.0
    # brightness +10 -> landmarks move by (1, 1) -> sqrt(2) / 25 px face
    assert result.per_image["b"]["landmarks"] == pytest.approx(math.sqrt(2) / 25, rel=1e-6)


def test_landmark_distance_with_the_project_mtcnn_detector_on_a_real_face(tmp_path):
    detection = pytest.importorskip("codeformer_lightning.inference.detection")
    skimage_data = pytest.importorskip("skimage.data")
    face = np.ascontiguousarray(skimage_data.astronaut()[30:210, 130:310])  # the astronaut's face, 180 px
    write_folder(tmp_path / "gt", {"astronaut": face})
    write_folder(tmp_path / "same", {"astronaut": face})
    shifted = np.roll(face, (6, 8), axis=(0, 1))  # content moves 8 px right, 6 px down
    write_folder(tmp_path / "shifted", {"astronaut": shifted})
    config = EvaluationConfig(metrics=["landmarks"])
    suite = MetricSuite(config, detector=detection.MTCNNDetector())
    assert (
        evaluate_folders(tmp_path / "same", tmp_path / "gt", suite=suite).per_image["astronaut"]["landmarks"]
        == 0.0
    )
    moved = evaluate_folders(tmp_path / "shifted", tmp_path / "gt", suite=suite)
    gt_face = max(suite.detector.detect(face), key=lambda f: f.size)
    assert moved.per_image["astronaut"]["landmarks"] == pytest.approx(10 / gt_face.size, rel=0.35)


def test_landmarks_without_a_face_are_left_out_of_the_mean_with_a_note(tmp_path):
    class NoFace:
        def detect(self, image):
            return []

    gts = random_faces(2)
    write_folder(tmp_path / "gt", {"a": gts[0], "b": gts[1]})
    write_folder(tmp_path / "r", {"a": gts[0], "b": gts[1]})
    result = evaluate_folders(
        tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["psnr", "landmarks"]), detector=NoFace()
    )
    assert result.per_image["a"]["landmarks"] is None and result.mean["landmarks"] is None
    assert any("no face found in 2 of 2" in n for n in result.notes)


# ----------------------------------------------------------------------------- folders and bad input
def test_pairing_lists_unmatched_names_on_both_sides(tmp_path):
    imgs = random_faces(3)
    write_folder(tmp_path / "gt", {"a": imgs[0], "b": imgs[1], "only_gt": imgs[2]})
    write_folder(tmp_path / "r", {"a": imgs[0], "b": imgs[1], "typo_r": imgs[2]})
    with pytest.raises(
        PairingError, match=r"only in restored \(1\): typo_r[\s\S]*only in ground truth \(1\): only_gt"
    ):
        pair_folders(tmp_path / "r", tmp_path / "gt")
    write_folder(tmp_path / "r2", {"a": imgs[0]}, suffix=".jpg")
    write_folder(tmp_path / "r2", {"a": imgs[0]}, suffix=".png")
    with pytest.raises(PairingError, match="two images named 'a'"):
        pair_folders(tmp_path / "r2", tmp_path / "gt")


def test_size_mismatch_resizes_with_a_warning_or_fails_the_pair(tmp_path):
    gt = random_faces(1, 32)[0]
    big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(gt).resize((64, 64)))
    write_folder(tmp_path / "gt", {"a": gt})
    write_folder(tmp_path / "r", {"a": big})
    with pytest.warns(UserWarning, match="resized to ground truth 32x32"):
        result = evaluate_folders(tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["psnr"]))
    assert result.per_image["a"]["psnr"] > 25
    with pytest.warns(UserWarning, match="skipped a"):
        result = evaluate_folders(
            tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["psnr"], size_mismatch="error")
        )
    assert "64x64" in result.failed["a"] and result.per_image == {} and result.mean["psnr"] is None


def test_a_corrupt_image_is_reported_and_the_rest_evaluated(tmp_path):
    imgs = random_faces(2)
    write_folder(tmp_path / "gt", {"a": imgs[0], "b": imgs[1]})
    write_folder(tmp_path / "r", {"a": imgs[0]})
    (tmp_path / "r" / "b.png").write_bytes((tmp_path / "gt" / "b.png").read_bytes()[:60])  # truncated
    with pytest.warns(UserWarning, match="skipped b"):
        result = evaluate_folders(tmp_path / "r", tmp_path / "gt", EvaluationConfig(metrics=["psnr", "ssim"]))
    assert "b.png" in result.failed["b"]
    assert list(result.per_image) == ["a"] and result.mean == {"psnr": PSNR_CAP, "ssim": pytest.approx(1.0)}


def test_loader_converts_grayscale_rgba_and_16_bit_and_rejects_tiny_images(tmp_path):
    from PIL import Image

    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    loaded = load_image(tmp_path / "gray.png")
    assert loaded.shape == (1, 3, 32, 32) and loaded.dtype == torch.float32
    assert torch.equal(loaded[0, 1], torch.from_numpy(gray).float() / 255)
    Image.fromarray(np.zeros((32, 32, 4), np.uint8) + 200).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").shape == (1, 3, 32, 32)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 0..65535: same levels
    assert torch.equal(load_image(tmp_path / "g16.png"), loaded)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(BadImageError, match="tiny.png.*too small"):
        load_image(tmp_path / "tiny.png")
    with pytest.raises(BadImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")

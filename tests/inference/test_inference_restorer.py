"""FaceRestorer with a tiny network: batching, geometry, upscale, weights, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_helpers import shared_folder

from codeformer_lightning.inference.align import apply_affine, face_template, invert_affine
from codeformer_lightning.inference.detection import Face
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.nn import CodeFormer


class FixedDetector:
    """Returns the same faces for every image (placed by similarity transforms of the template)."""

    def __init__(self, centres: list[tuple[float, float]], eye_distance: float = 20.0) -> None:
        template = face_template(512).astype(np.float64)
        scale = eye_distance / (template[1, 0] - template[0, 0])
        self.faces = []
        for cx, cy in centres:
            points = (template - template.mean(0)) * scale + (cx, cy)
            box = np.array([*points.min(0) - 10, *points.max(0) + 10])
            self.faces.append(Face(box, points, 0.99))
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return list(self.faces)


class CountingModel(torch.nn.Module):
    """Wraps a CodeFormer, recording the batch size of each call."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.batches: list[int] = []

    def forward(self, x, w=0.5, adain=True):
        self.batches.append(x.shape[0])
        return self.inner(x, w=w, adain=adain)


def _photo(height=96, width=128, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_whole_image_restore_shapes_and_locality(tiny_model):
    detector = FixedDetector([(40, 48)])
    restorer = FaceRestorer(tiny_model, detector=detector)
    image = _photo()
    result = restorer.restore(image, w=0.7)
    assert restorer.face_size == 32 and result.ws == [0.7]
    assert len(result.faces) == 1 and result.affines[0].shape == (2, 3)
    assert result.cropped_faces[0].shape == (32, 32, 3) and result.restored_faces[0.7][0].shape == (32, 32, 3)
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    assert (result.image[:, 100:] == image[:, 100:]).all()  # far from the face: untouched
    assert (result.image != image).any()
    # the crop corners map back around the face
    corners = apply_affine(invert_affine(result.affines[0]), np.array([[0, 0], [32, 32]]))
    assert corners[0, 0] < 40 < corners[1, 0]


def test_multiple_weights_and_network_matches_direct_call(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(40, 48)]))
    result = restorer.restore(_photo(), w=[0.0, 1.0, 0.0])
    assert result.ws == [0.0, 1.0] and set(result.images) == {0.0, 1.0}
    crop = torch.from_numpy(result.cropped_faces[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        direct = ((tiny_model(crop, w=1.0) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    # equal up to float rounding landing on the other side of .5
    assert np.abs(result.restored_faces[1.0][0].astype(int) - direct).max() <= 1
    assert (result.restored_faces[0.0][0] != result.restored_faces[1.0][0]).any()
    with pytest.raises(ValueError, match=">= 0"):
        restorer.restore(_photo(), w=-0.5)
    with pytest.warns(UserWarning, match="w=1.5 > 1 extrapolates"):  # allowed, as in the published inference
        assert restorer.restore(_photo(), w=1.5).ws == [1.5]


def test_faces_across_images_share_network_batches(tiny_model):
    counting = CountingModel(tiny_model)
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(30, 40), (90, 50)]), batch_size=3)
    restorer.model = counting
    results = restorer.restore_batch([_photo(seed=1), _photo(seed=2)], w=0.5)
    assert counting.batches == [3, 1]  # 4 faces from 2 images pooled into batches of 3
    assert [len(r.cropped_faces) for r in results] == [2, 2]
    # pooled results equal per-image ones (up to batch-size dependent float rounding)
    alone = restorer.restore(_photo(seed=2), w=0.5)
    assert np.abs(alone.image.astype(int) - results[1].image).max() <= 1


def test_only_center_face_and_draw_box(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(20, 30), (64, 48)]), only_center_face=True,
                            draw_box=True)
    result = restorer.restore(_photo())
    assert len(result.faces) == 1 and np.allclose(result.faces[0].landmarks.mean(0), (64, 48))
    assert (result.image[..., 1] == 255).sum() > 20  # green box drawn


def test_upscale_and_background_hook(tiny_model):
    image = _photo()
    calls = []

    def upsampler(img, factor):
        calls.append((img.shape, factor))
        return np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)

    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(40, 48)]), upscale=2, background_upsampler=upsampler)
    result = restorer.restore(image)
    assert calls == [(image.shape, 2)] and result.image.shape == (192, 256, 3)
    assert (result.image[::2, 220::2] == image[:, 110:]).all()  # background from the hook, face elsewhere
    plain = FaceRestorer(tiny_model, detector=FixedDetector([(40, 48)]), upscale=1.5).restore(image)
    assert plain.image.shape == (144, 192, 3)


def test_no_face_and_tiny_image_are_copied_through(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([]))
    image = _photo()
    result = restorer.restore(image)
    assert result.faces == [] and (result.image == image).all() and "no face" in result.notes[0]
    from codeformer_lightning.inference.detection import MTCNNDetector

    tiny = np.zeros((6, 9, 3), np.uint8)
    result = FaceRestorer(tiny_model, detector=MTCNNDetector()).restore(tiny)
    assert (result.image == tiny).all() and "smaller than the smallest detectable face" in result.notes[0]


def test_aligned_input_is_resized_and_not_detected(tiny_model):
    detector = FixedDetector([(1, 1)])
    restorer = FaceRestorer(tiny_model, detector=detector)
    result = restorer.restore(_photo(64, 64), w=[0.2, 0.9], aligned=True)
    assert detector.calls == 0 and result.faces == []
    assert result.image.shape == (32, 32, 3) and "resized from 64 to 32" in result.notes[0]
    assert "not square" in restorer.restore(_photo(64, 50), aligned=True).notes[0]


def test_face_size_different_from_network(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(60, 60)]), face_size=64)
    result = restorer.restore(_photo(128, 128))
    assert result.cropped_faces[0].shape == (64, 64, 3) and result.restored_faces[0.5][0].shape == (64, 64, 3)


def test_loads_weight_files_and_rejects_bad_arguments(tiny_weights, tiny_model, tmp_path):
    restorer = FaceRestorer(tiny_weights, detector=FixedDetector([]))
    assert restorer.face_size == 32
    with pytest.raises(ValueError, match="fp16"):
        FaceRestorer(tiny_model, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        FaceRestorer(tiny_model, precision="int8")
    from codeformer_lightning.checkpoints import save_weights
    from codeformer_lightning.nn import VQAutoEncoder

    ae = VQAutoEncoder(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,),
                       codebook_size=64, emb_dim=32, norm_groups=8)
    path = save_weights(ae, tmp_path / "ae.safetensors")
    with pytest.raises(TypeError, match="not a CodeFormer"):
        FaceRestorer(path)
    with pytest.raises(ValueError, match="uint8"):
        restorer.restore(np.zeros((32, 32, 3), np.float32))


def test_bf16_autocast_runs_on_cpu(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(40, 48)]), precision="bf16")
    result = restorer.restore(_photo())
    assert result.image.dtype == np.uint8 and result.image.shape == (96, 128, 3)


class IdentityCodeFormer(CodeFormer):
    """'Restores' by returning its input: the whole geometric chain must then reproduce the photo."""

    def forward(self, x, w=0.5, adain=True):
        return x


@pytest.mark.parametrize("upscale", [1, 2])
def test_identity_network_reproduces_real_photo(tiny_cf_config, upscale):
    import cv2

    from codeformer_lightning.inference.detection import MTCNNDetector
    from codeformer_lightning.io import read_image

    image = read_image(shared_folder("whole") / "00.jpg")
    model = IdentityCodeFormer(**tiny_cf_config)
    model.config["img_size"] = 128  # the identity keeps detail: crops at 128 px
    restorer = FaceRestorer(model, detector=MTCNNDetector(), upscale=upscale)
    result = restorer.restore(image)
    assert len(result.faces) == 4
    reference = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC) if upscale > 1 else image
    assert result.image.shape == reference.shape
    diff = np.abs(result.image.astype(int) - reference).mean(axis=2)
    for face in result.faces:
        x1, y1, x2, y2 = (face.box * upscale).astype(int)
        # faces land back where they came from: a misplaced face would differ by tens of levels
        assert diff[y1:y2, x1:x2].mean() < 6, diff[y1:y2, x1:x2].mean()


def test_numpy_weights_are_accepted(tiny_model):
    restorer = FaceRestorer(tiny_model, detector=FixedDetector([(40, 48)]))
    assert restorer.restore(_photo(), w=np.float32(0.25)).ws == [0.25]
    assert restorer.restore(_photo(), w=np.array([0.1, 0.9])).ws == [pytest.approx(0.1), pytest.approx(0.9)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_low_precision_close_to_fp32(tiny_model, precision):
    detector = FixedDetector([(40, 48), (90, 50)])
    image = _photo()
    reference = FaceRestorer(tiny_model, detector=detector, device="cuda").restore(image)
    low = FaceRestorer(tiny_model, detector=detector, device="cuda", precision=precision).restore(image)
    diff = np.abs(low.image.astype(int) - reference.image)
    # loose: a random tiny network's code argmax may flip under reduced precision
    assert diff.mean() < 16 and low.image.shape == image.shape and low.image.dtype == np.uint8

"""warp_faces / paste_faces (torch, batched) against the single-face cv2 path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from deploy_media import placed_landmarks, textured_image

from codeformer_lightning.deploy.batched import _blur, _erode, paste_faces, warp_faces
from codeformer_lightning.inference.align import estimate_alignment, warp_face
from codeformer_lightning.inference.paste import paste_back

SHARED = Path(__file__).resolve().parents[3] / "shared" / "faces" / "aligned"
H, W, S = 120, 160, 64


# faces: rotated, enlarged, cut by the bottom-right corner, small and steeply rotated at the left edge
AFFINES = np.stack([
    estimate_alignment(placed_landmarks(60, 60, 0.8, 0.2), S),
    estimate_alignment(placed_landmarks(100, 50, 1.3, -0.4), S),
    estimate_alignment(placed_landmarks(150, 110, 0.7, 0.0), S),
    estimate_alignment(placed_landmarks(20, 100, 0.5, 1.0), S),
])
FRAME_INDEX = np.array([0, 0, 1, 1])


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def test_warp_faces_matches_cv2_warp_affine():
    frames = [textured_image(0), textured_image(1)]
    crops = warp_faces(_to_tensor(frames), AFFINES, torch.from_numpy(FRAME_INDEX), S)
    assert crops.shape == (4, 3, S, S)
    for f in range(4):
        ref = warp_face(frames[FRAME_INDEX[f]], AFFINES[f], S).astype(np.float32)
        diff = np.abs(crops[f].permute(1, 2, 0).numpy() - ref)
        # cv2 rounds its result to uint8 (<= 0.5) and uses 1/32-px fixed-point weights (a further few
        # hundredths of a level): anything above 0.6 would mean a geometry error (a half-pixel shift
        # of this texture moves values by ~10 levels)
        assert diff.max() < 0.6, f
        assert diff.mean() < 0.3


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/faces/aligned (real faces) is absent")
def test_warp_faces_on_a_real_face_matches_cv2():
    face = cv2.cvtColor(cv2.imread(str(sorted(SHARED.glob("*"))[0])), cv2.COLOR_BGR2RGB)
    frame = cv2.resize(face, (W * 2, H * 2), interpolation=cv2.INTER_AREA)
    affine = estimate_alignment(placed_landmarks(160, 120, 2.0, 0.3, 128), 128)
    crop = warp_faces(_to_tensor([frame]), affine[None], [0], 128)[0].permute(1, 2, 0).numpy()
    ref = warp_face(frame, affine, 128).astype(np.float32)
    assert np.abs(crop - ref).max() < 0.6


def test_paste_faces_matches_single_face_paste_back():
    frames = [textured_image(2), textured_image(3)]
    faces = [textured_image(10 + f, S, S) for f in range(4)]
    out = paste_faces(_to_tensor(frames), _to_tensor(faces), AFFINES, FRAME_INDEX)
    for n in range(2):
        sel = [f for f in range(4) if FRAME_INDEX[f] == n]
        ref = paste_back(frames[n], [faces[f] for f in sel], [AFFINES[f] for f in sel]).astype(np.float32)
        diff = np.abs(out[n].permute(1, 2, 0).numpy() - ref)
        # the CPU path rounds the warped face and each blended face to uint8 (<= 0.5 each, two overlapping
        # faces in frame 0) and interpolates with fixed-point weights; the mask recipe is the same, so
        # nothing larger than ~1.5 levels may appear anywhere, and the mean stays well below one level
        assert diff.max() < 2.0, n
        assert diff.mean() < 0.25, n
        assert np.abs(out[n].permute(1, 2, 0).numpy() - frames[n]).max() > 50  # the faces did land


def test_paste_faces_leaves_frames_without_faces_and_skips_faces_outside():
    frames = _to_tensor([textured_image(4), textured_image(5)])
    outside = estimate_alignment(placed_landmarks(-500, -500, 1.0, 0.0), S)[None]
    faces = _to_tensor([textured_image(6, S, S)])
    out = paste_faces(frames, faces, outside, [0])
    assert torch.equal(out, frames)
    out = paste_faces(frames, faces, AFFINES[:1], [0])
    assert torch.equal(out[1], frames[1]) and not torch.equal(out[0], frames[0])


def test_mask_blur_equals_cv2_gaussian_blur():
    rng = np.random.default_rng(0)
    image = rng.random((40, 50)).astype(np.float32)
    for ksize in (1, 5, 9, 21, 33):
        ours = _blur(torch.from_numpy(image)[None, None], ksize)[0, 0].numpy()
        np.testing.assert_allclose(ours, cv2.GaussianBlur(image, (ksize, ksize), 0), atol=1e-5)
    # an image smaller than the kernel: reflect-101 padding wraps more than once
    small = rng.random((6, 7)).astype(np.float32)
    np.testing.assert_allclose(_blur(torch.from_numpy(small)[None, None], 21)[0, 0].numpy(),
                               cv2.GaussianBlur(small, (21, 21), 0), atol=1e-5)


@pytest.mark.parametrize("ksize", [5, 9, 13, 21, 41, 129])  # feather widths 1..32 px: ksize = 4 w + 1
def test_mask_blur_kernel_is_cv2s_gaussian(ksize):
    """The impulse response far from the borders is the outer product of cv2.getGaussianKernel's taps
    (block boundaries of the banded product included: 129 > one 64-row block). Those taps, computed
    independently: the binomial row for ksize 5 (cv2's fixed small table), else the Gaussian of cv2's
    documented sigma = 0.3 ((ksize - 1) / 2 - 1) + 0.8 (ksize 9 rounded to cv2's fixed point)."""
    size = 2 * ksize + 70
    impulse = torch.zeros(1, 1, size, size)
    impulse[0, 0, size // 2, size // 2] = 1.0
    response = _blur(impulse, ksize)[0, 0].numpy()
    taps = cv2.getGaussianKernel(ksize, 0).ravel()
    half = ksize // 2
    window = response[size // 2 - half : size // 2 + half + 1, size // 2 - half : size // 2 + half + 1]
    np.testing.assert_allclose(window, np.outer(taps, taps), atol=1e-7)
    assert abs(response.sum() - 1.0) < 1e-5 and np.count_nonzero(response > 1e-12) == ksize * ksize
    if ksize == 5:
        np.testing.assert_array_equal(taps, np.array([1, 4, 6, 4, 1]) / 16)
        return
    sigma = 0.3 * ((ksize - 1) / 2 - 1) + 0.8
    gauss = np.exp(-((np.arange(ksize) - half) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(taps, gauss / gauss.sum(), atol=2.1e-3 if ksize == 9 else 1e-12)


def test_erosion_equals_cv2_erode():
    rng = np.random.default_rng(1)
    image = rng.random((30, 40)).astype(np.float32)
    for size in (2, 3, 4, 7):
        ours = _erode(torch.from_numpy(image)[None, None], size)[0, 0].numpy()
        np.testing.assert_array_equal(ours, cv2.erode(image, np.ones((size, size), np.uint8)))


def test_bad_arguments_are_rejected():
    frames = _to_tensor([textured_image(0)])
    with pytest.raises(ValueError, match="affines"):
        warp_faces(frames, np.zeros((2, 3)), [0], S)
    with pytest.raises(ValueError, match="frame indices"):
        warp_faces(frames, AFFINES[:2], [0], S)
    with pytest.raises(ValueError, match="out of range"):
        paste_faces(frames, _to_tensor([textured_image(1, S, S)]), AFFINES[:1], [3])

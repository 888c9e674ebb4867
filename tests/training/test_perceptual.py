"""LPIPS: loading from local files in the published layouts, clear errors, metric properties.

The weight files are random but written in the real layouts (torchvision's vgg16 state dict, the
lpips package's v0.1 ``vgg.pth`` and its whole-model state dict), so loading is exercised exactly.
"""

from __future__ import annotations

import pytest
import torch
from random_weights import random_vgg16_state

from codeformer_lightning.losses import LPIPS, VQGANLoss
from codeformer_lightning.losses.perceptual import VGG16_FILE

_LIN_CH = [64, 128, 256, 512, 512]
_SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}


def _vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_vgg16_state(seed, classifier=True)  # torchvision files also hold the classifier


def _lin_state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c for k, c in enumerate(_LIN_CH)}


@pytest.fixture
def weight_files(tmp_path):
    vgg, lin = tmp_path / VGG16_FILE, tmp_path / "vgg.pth"
    torch.save(_vgg_state(), vgg)
    torch.save(_lin_state(), lin)
    return vgg, lin


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear") * 2 - 1


def test_lpips_is_a_distance_growing_with_distortion(weight_files):
    lpips = LPIPS(*weight_files)
    assert lpips.has_linear_heads
    x = _images(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(lpips(x, x), torch.zeros(3))
    y = (x + 0.2 * noise).clamp(-1, 1)
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(d, d[1:])), d
    assert d[0] > 0


def test_lpips_matches_the_formula_with_the_linear_heads(weight_files):
    lpips = LPIPS(*weight_files)
    x, y = _images(1, seed=1), _images(1, seed=2)
    fx, fy = lpips.features(x), lpips.features(y)
    lin, expected = _lin_state(), torch.zeros(())
    for k, (a, b) in enumerate(zip(fx, fy)):
        diff = a / (a.norm(dim=1, keepdim=True) + 1e-10) - b / (b.norm(dim=1, keepdim=True) + 1e-10)
        expected = expected + (lin[f"lin{k}.model.1.weight"] * diff**2).sum(1).mean()
    torch.testing.assert_close(lpips(x, y), expected.view(1))
    assert [f.shape[1] for f in fx] == _LIN_CH and [f.shape[-1] for f in fx] == [32, 16, 8, 4, 2]


def test_lpips_reads_the_lpips_package_whole_model_layout(tmp_path, weight_files):
    combined = {f"net.slice{_SLICE_OF[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                for k, v in _vgg_state().items() if k.startswith("features.")}
    combined.update(_lin_state())
    combined["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(combined, tmp_path / "lpips_full.pth")
    x, y = _images(2, seed=3), _images(2, seed=4)
    one_file = LPIPS(tmp_path / "lpips_full.pth")
    assert one_file.has_linear_heads
    torch.testing.assert_close(one_file(x, y), LPIPS(*weight_files)(x, y))


def test_lpips_without_linear_heads_warns_and_weighs_channels_equally(weight_files):
    with pytest.warns(UserWarning, match="vgg.pth"):
        lpips = LPIPS(weight_files[0])
    assert not lpips.has_linear_heads
    x = _images(2)
    assert lpips(x, x).abs().max() == 0 and (lpips(x, -x) > 0).all()


def test_lpips_missing_file_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(tmp_path / "nope.pth")
    msg = str(err.value)
    assert "nope.pth" in msg and VGG16_FILE in msg and "perceptual_weight: 0" in msg and "vgg.pth" in msg


def test_lpips_uses_the_torch_hub_cache_when_no_path_given(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="torch hub cache"):
        LPIPS()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(_vgg_state(), tmp_path / "hub" / "checkpoints" / VGG16_FILE)
    with pytest.warns(UserWarning):
        lpips = LPIPS()
    assert lpips.weights_path == tmp_path / "hub" / "checkpoints" / VGG16_FILE


def test_lpips_rejects_files_in_another_layout(tmp_path, weight_files):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        LPIPS(tmp_path / "other.pth")
    bad = _vgg_state()
    bad["features.28.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="conv28_weight"):
        LPIPS(tmp_path / "bad.pth", weight_files[1])


def test_vqgan_loss_perceptual_term_and_no_checkpoint_bloat(weight_files):
    loss = VQGANLoss(perceptual_weights_path=weight_files[0], perceptual_linear_weights_path=weight_files[1])
    assert loss.state_dict() == {}  # the frozen VGG never goes into training checkpoints
    x = _images(2)
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.5))
    torch.testing.assert_close(total.detach(), logs["l1"] + logs["perceptual"] + 0.5)
    total.backward()
    assert recon.grad is not None and logs["perceptual"] > 0
    assert VQGANLoss(perceptual_weight=0).perceptual is None  # no weights needed at all

"""LPIPS: the lpips package's own computation, the shipped heads, loading, clear errors and hints.

The VGG16 weights are random but written in the real layouts (torchvision's vgg16 state dict, the
lpips package's v0.1 ``vgg.pth`` and its whole-model state dict), so loading is exercised exactly;
the expected distances come from the ``lpips`` package itself (installed into a folder of its own,
see ``tests/reference_packages.py``) given the same random VGG weights and heads.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from random_weights import random_vgg16_state
from reference_packages import import_reference

from codeformer_lightning.losses import LPIPS, VQGANLoss, perceptual
from codeformer_lightning.losses.perceptual import BUNDLED_HEADS, VGG16_FILE

_LIN_CH = [64, 128, 256, 512, 512]
#: the lpips package's VGG16 slices: torchvision ``features`` index -> slice number
_SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


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


@functools.cache
def _lpips_package_instance():
    # built once: torchvision's vgg16 initialises its 100M-parameter classifier too (seconds)
    lpips = import_reference("lpips")
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


def _lpips_package_model(vgg_state: dict, lin_state: dict):
    """``lpips.LPIPS(net="vgg")`` of the lpips package with the given VGG weights and heads."""
    model = _lpips_package_instance()
    state = {
        f"net.slice{_SLICE_OF[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
        for k, v in vgg_state.items()
        if k.startswith("features.")
    }
    missing, unexpected = model.load_state_dict({**state, **lin_state}, strict=False)
    # its fixed scaling buffers stay; `lins.K` is the same module as `linK` under a second name
    assert not unexpected and {k for k in missing if not k.startswith("lins.")} == {
        "scaling_layer.shift", "scaling_layer.scale",
    }  # fmt: skip
    for k in range(5):
        assert torch.equal(model.lins[k].model[1].weight, lin_state[f"lin{k}.model.1.weight"])
    return model.eval()


# ----------------------------------------------------------------------------- the computation
def test_lpips_equals_the_lpips_package_on_the_same_weights(weight_files):
    reference = _lpips_package_model(_vgg_state(), _lin_state())
    ours = LPIPS(*weight_files)
    x, y = _images(3, seed=1), _images(3, seed=2)
    expected = reference(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert expected.min() > 0
    # gradients too (the loss trains through them)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference(xr, y).sum().backward()
    ours(xo, y).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-8)


def test_published_input_handling_equals_lpips_on_imagenet_normalised_inputs(weight_files):
    # the published LPIPSLoss (use_input_norm, range_norm): [-1,1] -> [0,1] -> ImageNet mean/std -> lpips
    reference = _lpips_package_model(_vgg_state(), _lin_state())
    x, y = _images(2, seed=3), _images(2, seed=4)

    def published_loss_input(t: torch.Tensor) -> torch.Tensor:
        return ((t + 1) / 2 - _IMAGENET_MEAN) / _IMAGENET_STD

    expected = reference(published_loss_input(y), published_loss_input(x)).flatten()
    loss = LPIPS(*weight_files, imagenet_prenorm=True)
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-5, atol=1e-7)
    # one instance serves both: the standard metric by a per-call override
    torch.testing.assert_close(loss(x, y, imagenet_prenorm=False), reference(x, y).flatten(), rtol=1e-5, atol=1e-7)


def test_lpips_is_a_distance_growing_with_distortion(weight_files):
    lpips = LPIPS(*weight_files)
    x = _images(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(lpips(x, x), torch.zeros(3))
    y = (x + 0.2 * noise).clamp(-1, 1)
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(d, d[1:])), d


# ----------------------------------------------------------------------------- heads
def test_the_shipped_heads_are_the_lpips_v01_vgg_heads_and_the_default(weight_files):
    lpips = import_reference("lpips")
    from pathlib import Path

    wheel_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    wheel = torch.load(wheel_file, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    shipped = load_file(str(BUNDLED_HEADS))
    assert shipped.keys() == wheel.keys() and all(torch.equal(shipped[k], wheel[k]) for k in wheel)
    assert (BUNDLED_HEADS.parent / "LICENSE-lpips.txt").read_text().count("Richard Zhang") >= 1
    default = LPIPS(weight_files[0])  # no heads given: the shipped ones, no warning, no fallback
    assert default.has_linear_heads and default.linear_weights_path == BUNDLED_HEADS
    x, y = _images(2, seed=6), _images(2, seed=7)
    torch.testing.assert_close(default(x, y), _lpips_package_model(_vgg_state(), wheel)(x, y).flatten())


def test_uniform_heads_only_when_asked_for(weight_files):
    uniform = LPIPS(weight_files[0], uniform_heads=True)
    assert not uniform.has_linear_heads and uniform.linear_weights_path is None
    for k, c in enumerate(_LIN_CH):
        assert torch.equal(getattr(uniform, f"lin{k}"), torch.full((1, c, 1, 1), 1.0 / c))
    x = _images(2)
    assert uniform(x, x).abs().max() == 0 and (uniform(x, -x) > 0).all()
    with pytest.raises(ValueError, match="uniform_heads"):
        LPIPS(*weight_files, uniform_heads=True)


def test_missing_shipped_heads_fail_with_the_fix(weight_files, monkeypatch, tmp_path):
    monkeypatch.setattr(perceptual, "BUNDLED_HEADS", tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(weight_files[0])
    msg = str(err.value)
    assert "gone.safetensors" in msg and "reinstall" in msg
    assert "`linear_weights_path=/path/to/vgg.pth`" in msg and "`uniform_heads=true`" in msg


def test_lpips_reads_the_lpips_package_whole_model_layout(tmp_path, weight_files):
    combined = {f"net.slice{_SLICE_OF[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                for k, v in _vgg_state().items() if k.startswith("features.")}
    combined.update(_lin_state())
    combined["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(combined, tmp_path / "lpips_full.pth")
    x, y = _images(2, seed=3), _images(2, seed=4)
    one_file = LPIPS(tmp_path / "lpips_full.pth")
    assert one_file.has_linear_heads and one_file.linear_weights_path == tmp_path / "lpips_full.pth"
    torch.testing.assert_close(one_file(x, y), LPIPS(*weight_files)(x, y))


# ----------------------------------------------------------------------------- files and errors
def test_lpips_missing_file_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(tmp_path / "nope.pth")
    msg = str(err.value)
    assert "nope.pth" in msg and VGG16_FILE in msg and f"`weights_path=/path/to/{VGG16_FILE}`" in msg


def test_lpips_uses_the_torch_hub_cache_when_no_path_given(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="torch hub cache"):
        LPIPS()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(_vgg_state(), tmp_path / "hub" / "checkpoints" / VGG16_FILE)
    assert LPIPS().weights_path == tmp_path / "hub" / "checkpoints" / VGG16_FILE


def test_lpips_rejects_files_in_another_layout(tmp_path, weight_files):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        LPIPS(tmp_path / "other.pth")
    bad = _vgg_state()
    bad["features.28.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="conv28_weight"):
        LPIPS(tmp_path / "bad.pth", weight_files[1])
    with pytest.raises(ValueError, match="not LPIPS linear heads"):
        LPIPS(weight_files[0], tmp_path / "other.pth")


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


def test_stage3_shares_one_vgg_between_loss_and_metric(weight_files, tiny_cf_config):
    from codeformer_lightning.models.cft import CFTModule
    from codeformer_lightning.nn import CodeFormer

    module = CFTModule(CodeFormer(**tiny_cf_config), perceptual_weight=1.0, perceptual_weights=str(weight_files[0]))
    lpips_modules = {id(m) for m in module.modules() if isinstance(m, LPIPS)}
    assert len(lpips_modules) == 1 and module.image_loss.perceptual is module.lpips
    assert module.lpips.imagenet_prenorm  # the loss: published input handling
    # the metric: the standard LPIPS, as a separately built standard instance computes it
    x, y = _images(2, seed=8), _images(2, seed=9)
    standard = LPIPS(weight_files[0])
    torch.testing.assert_close(module.lpips(x, y, imagenet_prenorm=False), standard(x, y))
    assert not torch.allclose(module.lpips(x, y), standard(x, y))
    # the loss term is the published-input LPIPS
    _, logs = module.image_loss.generator_loss(y, x, torch.zeros(()))
    torch.testing.assert_close(logs["perceptual"], LPIPS(weight_files[0], imagenet_prenorm=True)(x, y).mean())


# ----------------------------------------------------------------------------- hints name real keys
def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("codeformer_lightning.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _build(what: str, *overrides: str):
    """Instantiate ``model.loss`` or ``model`` of a composed config (the error it raises, if any)."""
    cfg = _compose(*overrides)
    try:
        instantiate(cfg.model.loss if what == "loss" else cfg.model)
    except Exception as exc:  # Hydra wraps the module's error; its text is what the user sees
        return str(exc)
    return None


#: per stage: the experiment its hints are for, how to build its LPIPS cheaply (the tiny experiment
#: has the same `model.*` keys), and the overrides that enable LPIPS there
_STAGES = {
    "vqgan": ("loss", "experiment=vqgan", "model.loss.perceptual_weights_path={vgg}",
              "model.loss.perceptual_linear_weights_path={heads}"),
    "code_predictor": ("model", "experiment=quickstart_code_predictor", "model.perceptual_weights={vgg}",
                       "model.perceptual_linear_weights={heads}"),
    "cft": ("model", "experiment=quickstart_cft", "model.perceptual_weights={vgg}",
            "model.perceptual_linear_weights={heads}", "model.perceptual_weight=1.0",
            "model.discriminator_from=random"),
}  # fmt: skip


@pytest.mark.parametrize("stage", list(_STAGES))
def test_every_lpips_hint_names_overrides_that_the_stage_config_accepts(stage, tmp_path, weight_files, monkeypatch):
    what, tiny, *enable = _STAGES[stage]
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    cases = {  # (VGG file, heads file): the problems each hint is for
        "missing VGG": (tmp_path / "nope.pth", "null"),
        "wrong VGG layout": (tmp_path / "other.pth", "null"),
        "missing heads": (weight_files[0], tmp_path / "nope_heads.pth"),
        "wrong heads layout": (weight_files[0], tmp_path / "other.pth"),
        "missing shipped heads": (weight_files[0], "null"),
    }
    monkeypatch.setattr(perceptual, "BUNDLED_HEADS", tmp_path / "gone.safetensors")
    for case, (vgg, heads) in cases.items():
        message = _build(what, tiny, *(o.format(vgg=vgg, heads=heads) for o in enable))
        assert message is not None, f"{stage}, {case}: no error"
        hints = re.findall(r"`([\w.]+=[^`]*)`", message)
        assert hints, f"{stage}, {case}: the message names no setting: {message}"
        for hint in hints:
            assert hint.startswith("model."), f"{stage}, {case}: {hint} is not a config key ({message})"
            _compose(f"experiment={stage}", hint)  # raises (e.g. "not in struct") if the key does not exist

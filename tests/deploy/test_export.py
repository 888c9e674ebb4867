"""Exported graphs (ONNX, TorchScript, torch.export) against the PyTorch model: w as an input for
restoration, the published settings fixed for colorization and inpainting (mask an input)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from codeformer_lightning.deploy import export as ex


@pytest.fixture(scope="module")
def onnx_fp32(tiny_model, tmp_path_factory):
    path = ex.export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return path, ex.onnx_session(path)


def _images(batch: int, size: int = 32, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def _published(model, x, w: float):
    """The published call: a Python float w (w = 0 skips the fusion blocks altogether)."""
    with torch.no_grad():
        out = model.restore(x, w, adain=True)
    return out.image.clamp(-1, 1), out.indices


def test_onnx_file_is_valid_and_declares_the_contract(onnx_fp32):
    path, session = onnx_fp32
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["image", "w"]
    assert inputs["image"].type == "tensor(float)" and inputs["w"].type == "tensor(float)"
    assert isinstance(inputs["image"].shape[0], str)  # dynamic batch
    assert [o.name for o in session.get_outputs()] == ["restored", "indices"]


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_onnx_matches_published_float_path(tiny_model, onnx_fp32, w):
    _, session = onnx_fp32
    x = _images(3)  # exported at batch 1: runs at batch 3
    restored, indices = ex.run_onnx(session, x.numpy(), w)
    ref_image, ref_indices = _published(tiny_model, x, w)
    assert restored.shape == (3, 3, 32, 32) and indices.shape == (3, 16)
    assert np.abs(restored - ref_image.numpy()).max() < 1e-4
    np.testing.assert_array_equal(indices, ref_indices.numpy())
    assert restored.min() >= -1 and restored.max() <= 1


def test_onnx_per_sample_w_equals_separate_runs(tiny_model, onnx_fp32):
    _, session = onnx_fp32
    x = _images(2, seed=5)
    restored, indices = ex.run_onnx(session, x.numpy(), np.array([0.0, 1.0], np.float32))
    for i, w in enumerate([0.0, 1.0]):
        ref_image, ref_indices = _published(tiny_model, x[i : i + 1], w)
        assert np.abs(restored[i] - ref_image[0].numpy()).max() < 1e-4
        np.testing.assert_array_equal(indices[i], ref_indices[0].numpy())
    # w matters in this model, so the comparison above is not vacuous
    both_zero, _ = ex.run_onnx(session, x.numpy(), 0.0)
    assert np.abs(both_zero[1] - restored[1]).max() > 1e-2


def test_tensor_w_zero_is_bit_identical_to_the_published_skip(tiny_model):
    """With w a tensor every fusion block runs; dec + 0 * (...) must still equal the skipped path."""
    wrapper = ex.ExportableCodeFormer(tiny_model)
    x = _images(2, seed=7)
    ref_image, ref_indices = _published(tiny_model, x, 0.0)
    with torch.no_grad():
        for w in (torch.tensor(0.0), torch.zeros(1), torch.zeros(2)):
            image, indices = wrapper(x, w)
            assert torch.equal(image, ref_image)
            assert torch.equal(indices, ref_indices)


def test_fp16_onnx_has_fp16_weights_and_fp32_io(tiny_model, tmp_path):
    path = ex.export_onnx(tiny_model, tmp_path / "tiny16.onnx", dtype="fp16")
    proto = onnx.load(str(path))
    float_inits = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [t for t in float_inits if np.prod(t.dims) > 16]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    session = ex.onnx_session(path)
    assert session.get_inputs()[0].type == "tensor(float)"
    x = _images(2, seed=9)
    restored, indices = ex.run_onnx(session, x.numpy(), np.array([0.0, 1.0], np.float32))
    assert restored.dtype == np.float32
    ref = torch.cat([_published(tiny_model, x[i : i + 1], w)[0] for i, w in enumerate([0.0, 1.0])])
    ref_idx = torch.cat([_published(tiny_model, x[i : i + 1], w)[1] for i, w in enumerate([0.0, 1.0])])
    # fp16 rounding (about 1e-3 relative) through ~40 layers; the codes must not flip
    np.testing.assert_array_equal(indices, ref_idx.numpy())
    assert np.abs(restored - ref.numpy()).max() < 2e-2


def _plain_eager(model, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference on the plain torch ops the exported graphs hold: with autograd on, the
    blocks skip their fused CPU inference path (which agrees only to float rounding, ~1e-5)."""
    with torch.enable_grad():
        image, indices = ex.ExportableCodeFormer(model)(x, w)
    return image.detach(), indices


def test_torchscript_round_trip_dynamic_batch(tiny_model, tmp_path):
    path = ex.export_torchscript(tiny_model, tmp_path / "tiny.pt")
    module = ex.load_torchscript(path)
    x = _images(3, seed=11)
    w = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        image, indices = module(x, w)
    ref_image, ref_indices = _plain_eager(tiny_model, x, w)
    assert (image - ref_image).abs().max() < 1e-5
    assert torch.equal(indices, ref_indices)


def test_torch_export_round_trip_with_scalar_and_vector_w(tiny_model, tmp_path):
    path = ex.export_program(tiny_model, tmp_path / "tiny.pt2")
    module = ex.load_program(path)
    x = _images(3, seed=13)
    for w in (0.5, torch.tensor(0.0), torch.tensor([0.0, 0.5, 1.0])):
        with torch.no_grad():
            image, indices = module(x, w)
        ref_image, ref_indices = _plain_eager(tiny_model, x, torch.as_tensor(w))
        assert (image - ref_image).abs().max() < 1e-5
        assert torch.equal(indices, ref_indices)


def test_command_exports_and_checks(tiny_weights, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert ex.main(["--weights", tiny_weights, "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "max |diff|" in text and "equal code indices: 100.00%" in text
    diff = float(text.split("max |diff| vs PyTorch fp32 = ")[1].split(";")[0])
    assert diff < 1e-4


def test_command_errors_name_the_problem(tiny_weights, tmp_path, capsys):
    assert ex.main(["--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert ex.main(["--weights", tiny_weights, "--out", str(tmp_path / "x.onnx"), "--size", "512"]) == 2
    assert "32x32" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert ex.main(["--weights", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "bad.pth" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        ex.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--weights", "--out", "--task", "--format", "--fp16", "--no-adain", "--opset", "--size", "--check"):
        assert option in text
    assert "AdaIN" in text


# ----------------------------------------------------------------------------- the variants' graphs
def _holes(batch: int, seed: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] with white holes (exactly 1.0, as 255 normalises) and their 0/1 masks."""
    x = _images(batch, seed=seed)
    mask = torch.zeros(batch, 1, 32, 32)
    mask[:, :, 4:14, 6:20] = 1
    mask[1:, :, 18:30, 10:28] = 1
    return torch.where(mask.bool(), torch.ones_like(x), x), mask


def _published_inpainting(model, x: torch.Tensor) -> torch.Tensor:
    """inference_inpainting.py in float: mask = channels summing to 3, w=1, no AdaIN, composite."""
    mask = (x.sum(1, keepdim=True) == 3).float()
    with torch.no_grad():
        out = model.restore(x, 1.0, adain=False).image
    return ((1 - mask) * x + mask * out).clamp(-1, 1)


def test_command_exports_inpainting_weights_as_a_graph_with_a_mask_input(tiny_model, tmp_path, capsys):
    from codeformer_lightning.checkpoints import save_weights

    weights = str(save_weights(tiny_model, tmp_path / "inpainting.safetensors", variant="inpainting"))
    path = tmp_path / "inpainting.onnx"
    assert ex.main(["--weights", weights, "--out", str(path), "--check"]) == 0
    text = capsys.readouterr().out
    assert "inpainting: w=1, AdaIN off" in text and "inputs image, mask" in text
    assert float(text.split("max |diff| vs PyTorch fp32 = ")[1].split(";")[0]) < 1e-4
    session = ex.onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["image", "mask"]
    assert ex.onnx_settings(path) == {"task": "inpainting", "w": "1", "adain": "false"}
    x, mask = _holes(2)
    restored, indices = ex.run_onnx(session, x.numpy(), mask=mask.numpy())
    keep = ~mask.bool().expand_as(x).numpy()
    np.testing.assert_array_equal(restored[keep], x.numpy()[keep])  # unmasked pixels unchanged, to the bit
    assert np.abs(restored - _published_inpainting(tiny_model, x).numpy()).max() < 1e-4
    with torch.no_grad():
        np.testing.assert_array_equal(indices, tiny_model.restore(x, 1.0, adain=False).indices.numpy())
    with pytest.raises(ValueError, match="takes a mask"):
        ex.run_onnx(session, x.numpy())
    with pytest.raises(ValueError, match="takes no w"):
        ex.run_onnx(session, x.numpy(), 0.5, mask.numpy())
    # the mask's pixels are painted white inside the graph: holes of any colour give the same result
    painted = torch.where(mask.bool(), -torch.ones_like(x), x)
    again, _ = ex.run_onnx(session, painted.numpy(), mask=mask.numpy())
    assert np.abs(again[keep] - x.numpy()[keep]).max() == 0 and np.abs(again - restored).max() < 1e-5
    # settings the task fixes cannot be changed; --task restoration would give w as an input again
    assert ex.main(["--weights", weights, "--out", str(tmp_path / "c.onnx"), "--task", "colorization",
                    "--no-adain"]) == 2
    assert "fixed by the published inference" in capsys.readouterr().err and not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("export", marks=pytest.mark.slow)])
def test_inpainting_graph_in_torchscript_and_torch_export(tiny_model, tmp_path, fmt):
    if fmt == "torchscript":
        module = ex.load_torchscript(ex.export_torchscript(tiny_model, tmp_path / "inp.pt", task="inpainting"))
    else:
        module = ex.load_program(ex.export_program(tiny_model, tmp_path / "inp.pt2", task="inpainting"))
    x, mask = _holes(3, seed=23)
    with torch.no_grad():
        restored, _ = module(x, mask)
    keep = ~mask.bool().expand_as(x)
    assert torch.equal(restored[keep], x[keep])
    assert (restored - _published_inpainting(tiny_model, x)).abs().max() < 1e-4


def test_fp16_inpainting_graph_still_returns_the_unmasked_pixels_exactly(tiny_model):
    x, mask = _holes(2, seed=27)
    with torch.no_grad():
        restored, _ = ex.prepare(tiny_model, dtype="fp16", task="inpainting")(x, mask)
    keep = ~mask.bool().expand_as(x)
    assert restored.dtype == torch.float32 and torch.equal(restored[keep], x[keep])
    assert (restored - _published_inpainting(tiny_model, x)).abs().max() < 5e-2  # fp16 inside the holes


def test_colorization_graph_fixes_w0_and_adain(tiny_model, tmp_path, onnx_fp32):
    assert ex.onnx_settings(onnx_fp32[0]) == {"task": "restoration", "w": "input", "adain": "true"}
    path = ex.export_onnx(tiny_model, tmp_path / "colorization.onnx", task="colorization")
    session = ex.onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert ex.onnx_settings(path) == {"task": "colorization", "w": "0", "adain": "true"}
    x = _images(2, seed=25)
    restored, indices = ex.run_onnx(session, x.numpy())
    ref_image, ref_indices = _published(tiny_model, x, 0.0)
    assert np.abs(restored - ref_image.numpy()).max() < 1e-4
    np.testing.assert_array_equal(indices, ref_indices.numpy())
    with pytest.raises(ValueError, match="fixed by the published inference"):
        ex.prepare(tiny_model, adain=False, task="colorization")


@pytest.mark.slow
def test_published_size_onnx_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = ex.CodeFormer().eval()
    path = ex.export_onnx(model, tmp_path / "codeformer512.onnx")
    diff, same = ex.check_export(model, path, "onnx")
    assert diff < 1e-3 and same == 1.0


@pytest.mark.slow
def test_published_inpainting_weights_export_the_published_script(tmp_path, capsys):
    """Published-layout random inpainting weights: the command builds the mask graph by itself; on a
    shared masked face the graph gives the published script's output (published-style network)."""
    from pathlib import Path

    from published_files import KEYS_FILE, random_published_state
    from reference_impl import RefCodeFormer

    from codeformer_lightning.io import read_image

    faces = Path(__file__).parents[2] / ".." / "shared" / "faces" / "masked"
    if not KEYS_FILE.is_file() or not faces.is_dir():
        pytest.skip("published key list or shared masked faces not found")
    state = random_published_state("codeformer_inpainting")
    weights = tmp_path / "codeformer_inpainting.pth"
    torch.save({"params_ema": state}, weights)
    out = tmp_path / "inpainting.onnx"
    assert ex.main(["--weights", str(weights), "--out", str(out)]) == 0
    assert "inpainting: w=1, AdaIN off" in capsys.readouterr().out
    face = read_image(sorted(faces.glob("*.png"))[0])
    x = torch.from_numpy(face / 255.0).float().permute(2, 0, 1)[None].sub(0.5).div(0.5)
    mask = (x.sum(1, keepdim=True) == 3).float()  # the published rule
    restored, _ = ex.run_onnx(ex.onnx_session(out), x.numpy(), mask=mask.numpy())
    reference = RefCodeFormer(codebook_size=512, connect_list=["32", "64", "128"]).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = ((1 - mask) * x + mask * reference(x, w=1, adain=False)[0]).clamp(-1, 1)

    def to_uint8(t):
        return ((np.asarray(t)[0] + 1) / 2 * 255).round().astype(int)

    got, want = to_uint8(restored), to_uint8(expected)
    keep = np.broadcast_to(mask.numpy()[0] == 0, got.shape)
    np.testing.assert_array_equal(got[keep], face.transpose(2, 0, 1)[keep])
    assert np.abs(got - want).max() <= 1

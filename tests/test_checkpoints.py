"""Published-layout files: every variant loads, key mapping both ways, bad files give clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from published_files import KEYS_FILE, published_shapes, random_published_state, write_published_file

from codeformer_lightning import (
    CheckpointError,
    convert_checkpoint,
    inspect_checkpoint,
    load_pretrained,
    save_published,
    save_weights,
)
from codeformer_lightning.checkpoints import convert_main, native_to_published
from codeformer_lightning.nn import CodeFormer, PatchDiscriminator, VQAutoEncoder

needs_keys = pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"{KEYS_FILE} not found (shared/ folder absent)")

EXPECTED = {
    "codeformer": (CodeFormer, "restoration"),
    "codeformer_colorization": (CodeFormer, "colorization"),
    "codeformer_inpainting": (CodeFormer, "inpainting"),
    "vqgan_code1024": (VQAutoEncoder, "autoencoder"),
    "vqgan_discriminator": (PatchDiscriminator, "discriminator"),
}
FILE_KEY = {"vqgan_discriminator": "params_d"}


@pytest.fixture(scope="session")
def published_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    return {kind: write_published_file(folder / f"{kind}.pth", kind, FILE_KEY.get(kind, "params_ema")) for kind in EXPECTED}


@needs_keys
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_published_variant_loads_with_exact_keys_and_values(published_files, kind):
    cls, variant = EXPECTED[kind]
    model = load_pretrained(published_files[kind])
    assert type(model) is cls and model.variant == variant and not model.training
    state = model.state_dict()
    if cls is not PatchDiscriminator:
        state = native_to_published(state, model)
    expected = random_published_state(kind)
    assert {k: tuple(v.shape) for k, v in state.items()} == published_shapes(kind)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    info = inspect_checkpoint(published_files[kind])
    assert (info.kind, info.variant, info.layout) == (cls.__name__, variant, "published")


@needs_keys
@pytest.mark.parametrize("key", ["params", None, "params_d"])
def test_other_top_level_keys_and_bare_state_dicts(tmp_path, key):
    path = write_published_file(tmp_path / "d.pth", "vqgan_discriminator", key)
    assert isinstance(load_pretrained(path), PatchDiscriminator)


@needs_keys
def test_autoencoder_from_params_and_bare(tmp_path):
    for key in ("params", None):
        path = write_published_file(tmp_path / f"ae_{key}.pth", "vqgan_code1024", key)
        assert load_pretrained(path).variant == "autoencoder"


def test_native_round_trip_and_conversion_both_ways(tmp_path, tiny_cf_config):
    model = CodeFormer(**tiny_cf_config).eval()
    with torch.no_grad():
        model.position_emb.normal_()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = model(x, w=0.7)
    native = save_weights(model, tmp_path / "m.safetensors")
    published = save_published(model, tmp_path / "m.pth")
    back = convert_checkpoint(published, tmp_path / "back.safetensors")
    again = convert_checkpoint(back, tmp_path / "again.pth")
    for path in (native, published, back, again):
        loaded = load_pretrained(path)
        assert loaded.config == model.config
        torch.testing.assert_close(loaded(x, w=0.7), expected, atol=0, rtol=0)
    raw = torch.load(published, weights_only=True)
    assert "params_ema" in raw and any(k.startswith("encoder.blocks.") for k in raw["params_ema"])
    assert inspect_checkpoint(native).layout == "native"


def test_discriminator_and_autoencoder_round_trip(tmp_path, tiny_ae_config):
    ae = VQAutoEncoder(**tiny_ae_config)
    d = PatchDiscriminator(ndf=8, n_layers=3)
    for model in (ae, d):
        for path in (save_weights(model, tmp_path / "x.safetensors"), save_published(model, tmp_path / "x.pth")):
            loaded = load_pretrained(path)
            assert type(loaded) is type(model) and loaded.config == model.config
            for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
                assert k == k2 and torch.equal(a, b)


def test_convert_command(tmp_path, tiny_cf_config, capsys):
    src = save_weights(CodeFormer(**tiny_cf_config), tmp_path / "m.safetensors")
    assert convert_main([str(src), str(tmp_path / "m.pth")]) == 0
    assert convert_main(["--info", str(tmp_path / "m.pth")]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["kind"] == "CodeFormer" and info["layout"] == "published"
    with pytest.raises(SystemExit) as exc:
        convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- bad files
class NotWeights:
    pass


def _bad_files(tmp_path, tiny_cf_config):
    from safetensors.torch import save_file

    good = save_published(CodeFormer(**tiny_cf_config), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a weight file" * 50)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    pickled = tmp_path / "object.pth"
    torch.save({"params_ema": NotWeights()}, pickled)
    foreign = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "conv1.weight": torch.zeros(1)}, foreign)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    st_foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(st_foreign))
    native = save_weights(CodeFormer(**tiny_cf_config), tmp_path / "n.safetensors")
    st_trunc = tmp_path / "trunc.safetensors"
    st_trunc.write_bytes(native.read_bytes()[:-100])
    return {
        tmp_path / "missing.pth": "no such weight file",
        empty: "empty",
        truncated: "truncated",
        garbage: "cannot be read",
        pickled: "cannot be read",
        foreign: "not a CodeFormer weight file",
        tensor_only: "holds a Tensor",
        st_foreign: "not one written by codeformer_lightning",
        st_trunc: "safetensors",
    }


def test_bad_files_name_the_file_and_the_problem(tmp_path, tiny_cf_config):
    for path, message in _bad_files(tmp_path, tiny_cf_config).items():
        with pytest.raises(CheckpointError) as exc:
            load_pretrained(path)
        assert str(path) in str(exc.value) and message in str(exc.value), str(exc.value)


@needs_keys
def test_missing_keys_and_shape_mismatch_are_listed(tmp_path):
    state = random_published_state("vqgan_code1024")
    del state["generator.blocks.24.bias"]
    state["encoder.blocks.1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save({"params_ema": state}, path)
    with pytest.raises(CheckpointError) as exc:
        load_pretrained(path)
    text = str(exc.value)
    assert str(path) in text and "missing keys: generator.conv_out.bias" in text
    assert "encoder.levels.0.res.0.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in text


# ----------------------------------------------------------------------------- training checkpoints
def _lightning_like(state: dict, **extra) -> dict:
    """The top-level keys of a Lightning checkpoint (what ``trainer.save_checkpoint`` writes)."""
    return {"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.6.6", "state_dict": state, "loops": {},
            "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {}, **extra}


def test_a_foreign_lightning_checkpoint_is_named_with_every_top_level_key(tmp_path, tiny_ae_config):
    path = tmp_path / "other.ckpt"
    ae = VQAutoEncoder(**tiny_ae_config)
    torch.save(_lightning_like({f"model.{k}": v for k, v in ae.state_dict().items()}), path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert "without codeformer_lightning's network record" in message
    for key in ("callbacks", "hyper_parameters", "loops", "optimizer_states", "state_dict"):  # none cut off
        assert key in message
    # a dict holding no tensors at its top level: every key is listed, the telling one included
    torch.save({**{f"k{i:02d}": i for i in range(12)}, "state_dict": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="no tensors found.*k11, state_dict"):
        load_pretrained(tmp_path / "odd.pth")


def test_a_stage_checkpoint_is_loaded_by_its_own_module_only(tmp_path, tiny_ae_config):
    from codeformer_lightning.checkpoints import LIGHTNING_KEY, describe_network
    from codeformer_lightning.models.cft import CFTModule

    ae = VQAutoEncoder(**tiny_ae_config)
    record = {"module": "VQGANModule", "export": "ema.module.", "targets": None,
              "networks": {"net": describe_network(ae), "discriminator": None, "loss": None}}
    path = tmp_path / "stage1.ckpt"
    torch.save(_lightning_like({f"ema.module.{k}": v for k, v in ae.state_dict().items()}, **{LIGHTNING_KEY: record}),
               path)
    loaded = load_pretrained(path)  # the network the stage exports, from the recorded config
    assert type(loaded) is VQAutoEncoder and loaded.variant == "autoencoder"
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="a checkpoint of VQGANModule, not of CFTModule"):
        CFTModule.load_from_checkpoint(path)
    out = tmp_path / "stage1.safetensors"
    assert convert_main([str(path), str(out)]) == 0 and type(load_pretrained(out)) is VQAutoEncoder

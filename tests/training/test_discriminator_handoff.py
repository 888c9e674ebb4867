"""Stage I exports its discriminator; the pipeline hands it to stage III; a random start is explicit.

The published stage III loads a pretrained discriminator (``pretrain_network_d``); only the
published inpainting recipe starts from random weights (``pretrain_network_d: ~``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from codeformer_lightning.checkpoints import load_pretrained
from codeformer_lightning.losses import VQGANLoss
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.models.cft import CFTModule
from codeformer_lightning.nn import CodeFormer, PatchDiscriminator, VQAutoEncoder
from codeformer_lightning.pipeline import stage_overrides
from codeformer_lightning.training.callbacks import ExportWeights, discriminator_export_path

DISC = dict(ndf=16, n_layers=2)


def _compose(config_name: str, *overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("codeformer_lightning.conf", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def test_stage3_needs_an_explicit_discriminator_start(tiny_cf_config):
    def build(**kwargs):
        return CFTModule(CodeFormer(**tiny_cf_config), perceptual_weight=0.0, **kwargs)

    with pytest.raises(ValueError) as err:
        build(discriminator=PatchDiscriminator(**DISC))
    message = str(err.value)
    assert "model.discriminator_from is not set" in message and "model.discriminator_from=random" in message
    assert "vqgan_discriminator.safetensors" in message
    disc = PatchDiscriminator(**DISC)
    assert build(discriminator=disc, discriminator_from="random").discriminator is disc
    assert build(discriminator=PatchDiscriminator(**DISC), gan_weight=0.0).discriminator is not None  # no GAN term
    assert build().discriminator is None  # no discriminator at all: no GAN term, nothing to start
    with pytest.raises(ValueError, match="needs a discriminator"):
        build(discriminator_from="random")


def test_stage1_exports_its_discriminator_and_the_pipeline_hands_it_to_stage3(tmp_path, tiny_ae_config, tiny_cf_config):
    torch.manual_seed(0)
    stage1 = VQGANModule(VQAutoEncoder(**tiny_ae_config), PatchDiscriminator(**DISC), loss=VQGANLoss(perceptual_weight=0))
    export = tmp_path / "vqgan" / "weights" / "vqgan.safetensors"
    trainer = SimpleNamespace(is_global_zero=True)
    ExportWeights(export).on_train_end(trainer, stage1)
    disc_file = discriminator_export_path(export)
    assert disc_file == tmp_path / "vqgan" / "weights" / "vqgan_discriminator.safetensors" and disc_file.is_file()
    exported = load_pretrained(disc_file)
    assert type(exported) is PatchDiscriminator
    for a, b in zip(exported.state_dict().values(), stage1.discriminator.state_dict().values()):
        assert torch.equal(a, b)

    # the published pipeline: stage III gets stage I's discriminator besides its autoencoder
    stage = _compose("pipeline").pipeline.stages.cft
    assert OmegaConf.to_container(stage.discriminator_from) == {"vqgan": "model.discriminator_from"}
    overrides = stage_overrides(stage, tmp_path / "cft", {"vqgan": str(export)}, shared=[])
    assert f"model.discriminator_from='{disc_file}'" in overrides
    assert f"model.autoencoder='{export}'" in overrides
    # the quickstart pipeline does the same
    quick = _compose("train", "experiment=quickstart").pipeline.stages.cft
    assert OmegaConf.to_container(quick.discriminator_from) == {"vqgan": "model.discriminator_from"}

    # ... and stage III starts from exactly those weights
    module = CFTModule(CodeFormer(**tiny_cf_config), PatchDiscriminator(**DISC), perceptual_weight=0.0,
                       discriminator_from=str(disc_file))
    for a, b in zip(module.discriminator.state_dict().values(), stage1.discriminator.state_dict().values()):
        assert torch.equal(a, b)


def test_no_discriminator_export_means_no_handoff(tmp_path):
    export = tmp_path / "weights" / "vqgan.safetensors"
    stage = _compose("pipeline").pipeline.stages.cft
    overrides = stage_overrides(stage, tmp_path / "cft", {"vqgan": str(export)}, shared=[])
    assert not any(o.startswith("model.discriminator_from=") for o in overrides)


def test_published_recipes_start_the_discriminator_as_published():
    # stage III: from a file the user or the pipeline gives (no default); inpainting: random, as published
    assert _compose("train", "experiment=cft").model.discriminator_from is None
    assert _compose("train", "experiment=inpainting").model.discriminator_from == "random"

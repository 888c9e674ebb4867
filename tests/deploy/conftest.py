"""Fixtures of the deployment tests: one tiny random CodeFormer and its weight file per module."""

from __future__ import annotations

import pytest
import torch

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.nn import CodeFormer

TINY_CF = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,),
               codebook_size=64, emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2,
               fusion_resolutions=(8, 16))


def make_tiny_codeformer(seed: int = 0) -> CodeFormer:
    """Random tiny CodeFormer whose fusion blocks are not negligible (so w visibly matters)."""
    torch.manual_seed(seed)
    model = CodeFormer(**TINY_CF).eval()
    with torch.no_grad():
        # a spread-out codebook: the default init (+-1/K) makes every code look alike
        model.quantize.embedding.weight.normal_()
    return model


@pytest.fixture(scope="module")
def tiny_model() -> CodeFormer:
    return make_tiny_codeformer()


@pytest.fixture(scope="module")
def tiny_weights(tiny_model, tmp_path_factory) -> str:
    return str(save_weights(tiny_model, tmp_path_factory.mktemp("weights") / "tiny.safetensors"))

"""Shared fixtures: tiny model configurations and the published-layout helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_impl, published_files

TINY_AE = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,),
               codebook_size=64, emb_dim=32, norm_groups=8)
TINY_CF = dict(TINY_AE, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_ae_config() -> dict:
    return dict(TINY_AE)


@pytest.fixture
def tiny_cf_config() -> dict:
    return dict(TINY_CF)

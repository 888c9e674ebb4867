"""Fixtures for the inference tests: shared real photos, tiny weights, synthetic faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.nn import CodeFormer


@pytest.fixture
def tiny_model(tiny_cf_config) -> CodeFormer:
    torch.manual_seed(0)
    return CodeFormer(**tiny_cf_config).eval()


@pytest.fixture
def tiny_weights(tmp_path, tiny_model) -> Path:
    return save_weights(tiny_model, tmp_path / "weights" / "tiny.safetensors")


@pytest.fixture(scope="session")
def mtcnn():
    from codeformer_lightning.inference.detection import MTCNNDetector

    return MTCNNDetector()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _single_thread():
    """One torch thread: on the shared 2-core test machines, OpenMP threads fighting other jobs
    make MTCNN's many small convolutions 10x slower than one thread. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

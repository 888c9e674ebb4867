"""Fixtures for the serving tests: tiny random CodeFormer weights and a running server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve", reason="the [serve] extra (litserve) is not installed")

from serve_helpers import ServerProcess, stop_all, tiny_codeformer_config  # noqa: E402

from codeformer_lightning.checkpoints import save_weights  # noqa: E402
from codeformer_lightning.nn import CodeFormer  # noqa: E402

#: limits of the shared test server, small so that tests can cross them cheaply
MAX_REQUEST_BYTES = 400_000
MAX_PIXELS = 1_000_000
MAX_IN_FLIGHT = 6
MAX_BATCH_SIZE = 4


@pytest.fixture(scope="session", autouse=True)
def _no_server_outlives_the_tests():
    """A test that fails or skips between starting a server and stopping it leaves it running (with
    its worker processes); stop those when the session ends."""
    yield
    stop_all()


@pytest.fixture(scope="session")
def tiny_serve_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CodeFormer(**tiny_codeformer_config()).eval()
    return save_weights(model, tmp_path_factory.mktemp("serve_weights") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_serve_model(tiny_serve_weights) -> CodeFormer:
    from codeformer_lightning.checkpoints import load_pretrained

    return load_pretrained(tiny_serve_weights)


@pytest.fixture(autouse=True)
def _single_thread():
    """One torch thread in the test process, as in the servers (--threads 1): the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def serve_args(weights: Path, **overrides) -> list[str]:
    options = {"accelerator": "cpu", "threads": 1, "max-batch-size": MAX_BATCH_SIZE, "batch-timeout": 0.2,
               "max-request-bytes": MAX_REQUEST_BYTES, "max-pixels": MAX_PIXELS, "max-in-flight": MAX_IN_FLIGHT}
    options.update({k.replace("_", "-"): v for k, v in overrides.items()})
    args = ["--weights", str(weights)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


def start_server(weights: Path, **overrides) -> ServerProcess:
    return ServerProcess("codeformer_lightning.serve.api", serve_args(weights, **overrides),
                         ready_line="Application startup complete").wait_ready()


@pytest.fixture(scope="module")
def server(tiny_serve_weights):
    """One ``codeformer-serve`` for a test module (start-up costs seconds on a loaded machine)."""
    process = start_server(tiny_serve_weights)
    yield process
    process.stop()

"""``codeformer-pipeline``: train stage I -> II -> III in sequence, each from the previous export.

    codeformer-pipeline data.train_dir=/data/ffhq_512 trainer=ddp trainer.devices=8

The same command as ``codeformer-train`` with ``conf/pipeline.yaml`` (which sets ``pipeline``); see
:mod:`codeformer_lightning.pipeline` for how each stage is composed. From Python:
``run(compose_config(..., config_name="pipeline"))`` (see :mod:`.train`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .train import run_command


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``codeformer-pipeline``."""
    return run_command(cfg)


if __name__ == "__main__":
    main()

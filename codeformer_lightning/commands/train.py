"""``codeformer-train``: train one stage (or a pipeline of stages) from the Hydra config tree.

    codeformer-train experiment=quickstart                      # tiny stages I -> II -> III on CPU
    codeformer-train experiment=vqgan data.train_dir=/data/ffhq_512 trainer=ddp trainer.devices=8
    codeformer-train experiment=vqgan ckpt_path=outputs/vqgan/<run>/checkpoints/last.ckpt   # resume
    codeformer-train -m hparams_search=vqgan_optuna experiment=quickstart_vqgan          # Optuna sweep
    codeformer-train --cfg job experiment=cft                   # print the composed config, run nothing

Also ``python -m codeformer_lightning.commands.train ...`` (what Lightning's DDP launcher re-runs for
the other ranks). The configs live in ``codeformer_lightning/conf`` (``--help`` lists the groups).
Every run writes into ``outputs/<task_name>/<timestamp>/``: ``config.yaml`` (resolved), ``.hydra/``
(as composed and the overrides), ``checkpoints/``, the logger's folder and
``weights/<task_name>.safetensors``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .. import pipeline
from ..train import objective, train


def run(cfg: DictConfig) -> float | None:
    """Train what ``cfg`` describes: the stages of ``cfg.pipeline`` in sequence when it is set, else
    one stage; returns the sweep objective (``optimized_metric``) or None."""
    metrics = pipeline.run(cfg) if cfg.get("pipeline") else train(cfg)
    return objective(metrics, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``codeformer-train``."""
    return run(cfg)


if __name__ == "__main__":
    main()

"""Checks on a composed training config, run before anything is built.

Every problem found is collected and reported at once, each with the override that fixes it, so a
misconfigured run fails in the first second instead of after the data loaders have started or after
hours of training (a missing stage I weight file, ``trainer=ddp`` with one device, a typo'd path).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

#: Config keys (anywhere under ``data`` / ``model``) whose non-null value must be an existing file or
#: folder, with what the file is, for the message. Keys ending in ``_path`` are checked too.
PATH_KEYS: dict[str, str] = {
    "train_dir": "training image folder",
    "val_dir": "validation image folder",
    "train_lmdb": "training LMDB",
    "val_lmdb": "validation LMDB",
    "latent_codes": "latent-code file of the training set",
    "autoencoder": "stage I autoencoder weights",
    "init_from": "stage II weights to start stage III from",
    "pretrained": "pretrained weights",
    "perceptual_weights": "VGG16 weights of the perceptual loss",
    "perceptual_linear_weights": "LPIPS head weights of the perceptual loss",
}
#: Keys that a stage cannot run without, with the experiment that produces the file.
REQUIRED_KEYS: dict[str, str] = {
    "autoencoder": (
        "stage II trains on a frozen stage I autoencoder: set model.autoencoder=/path/to/vqgan.safetensors "
        "(exported by `codeformer-train experiment=vqgan` into <run>/weights/), or train all stages in "
        "sequence with `codeformer-pipeline`"
    ),
}


class ConfigError(ValueError):
    """The composed config cannot run; the message lists every problem and how to fix it."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a training config (or return silently)."""
    problems = [
        *_check_paths(cfg),
        *_check_sizes(cfg),
        *_check_trainer(cfg),
        *_check_loggers(cfg),
        *_check_callbacks(cfg),
        *_check_resume(cfg),
    ]
    if problems:
        raise ConfigError(
            "The configuration cannot run:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _walk(node, prefix: str) -> Iterator[tuple[str, str, object]]:
    """Yield ``(dotted key, last key, value)`` for every leaf under ``node``; interpolations resolved."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            value = "???" if OmegaConf.is_missing(node, key) else node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _walk(value, f"{prefix}.{key}")
            else:
                yield f"{prefix}.{key}", str(key), value
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _walk(value, f"{prefix}.{i}")


def _check_paths(cfg: DictConfig) -> list[str]:
    problems = []
    for group in ("data", "model"):
        if cfg.get(group) is None:
            continue
        for dotted, key, value in _walk(cfg[group], group):
            if key not in PATH_KEYS and not key.endswith("_path"):
                continue
            if value is None or value == "???":
                if key in REQUIRED_KEYS:
                    problems.append(f"{dotted} is not set: {REQUIRED_KEYS[key]}.")
                continue
            if not Path(str(value)).exists():
                what = PATH_KEYS.get(key, "file")
                hint = REQUIRED_KEYS.get(key, f"point {dotted}= at the {what}")
                problems.append(f"{dotted}={value}: no such file or folder ({what}); {hint}.")
    data = cfg.get("data")
    sources = ("train_dir", "train_lmdb", "train_shards")
    if data is not None and set(sources) & set(data.keys()):
        if all(data.get(key) is None for key in sources):
            problems.append(
                "no training data: set data.train_dir=/path/to/aligned_faces (a folder of 512x512 aligned "
                "faces such as FFHQ), data=lmdb data.train_lmdb=/path/to/train.lmdb or "
                "data=streaming data.train_shards=/path/or/uri/of/shards"
            )
    return problems


def _check_sizes(cfg: DictConfig) -> list[str]:
    data_size = OmegaConf.select(cfg, "data.image_size", default=None)
    net_size = OmegaConf.select(cfg, "model.net.img_size", default=None)
    if data_size is not None and net_size is not None and int(data_size) != int(net_size):
        return [
            f"data.image_size={data_size} but model.net.img_size={net_size}: the network sees "
            "images of one size; set both (the tiny models use 32 or 64, the published ones 512)"
        ]
    return []


def _is_distributed(strategy) -> bool:
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        return target.rsplit(".", 1)[-1] in {"DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy"}
    return isinstance(strategy, str) and strategy.split("_")[0] in {"ddp", "fsdp", "deepspeed"}


def _check_trainer(cfg: DictConfig) -> list[str]:
    trainer = cfg.get("trainer")
    if trainer is None:
        return ["no trainer config: select one with trainer=cpu|gpu|ddp|ddp_cpu|multinode"]
    problems = []
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", 1)
    num_nodes = int(trainer.get("num_nodes", 1))
    strategy = trainer.get("strategy", "auto")
    n_devices = devices if isinstance(devices, int) and devices > 0 else None
    if accelerator in {"gpu", "cuda"}:
        available = torch.cuda.device_count()
        if available == 0:
            problems.append(
                f"trainer.accelerator={accelerator} but no CUDA device is visible: use trainer=cpu "
                "(or trainer=ddp_cpu to try the distributed code paths on CPU)"
            )
        elif n_devices is not None and n_devices > available and "SLURM_JOB_ID" not in os.environ:
            problems.append(
                f"trainer.devices={n_devices} but this machine has {available} GPU(s): set "
                f"trainer.devices={available}"
            )
    if _is_distributed(strategy) and n_devices == 1 and num_nodes == 1:
        problems.append(
            "a distributed strategy (trainer=ddp / ddp_cpu / multinode) with trainer.devices=1 and "
            "trainer.num_nodes=1 runs one process: set trainer.devices=N (N > 1), or use trainer=gpu / cpu"
        )
    if num_nodes > 1 and not _is_distributed(strategy):
        problems.append(
            f"trainer.num_nodes={num_nodes} needs a distributed strategy: use trainer=multinode"
        )
    if accelerator == "cpu" and str(trainer.get("precision", "32-true")) in {"16-mixed", "16"}:
        problems.append(
            "trainer.precision=16-mixed is not supported on CPU: use trainer.precision=bf16-mixed or 32-true"
        )
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs", None)
    unlimited = (max_steps is None or max_steps < 0) and (max_epochs is not None and max_epochs < 0)
    if unlimited and not trainer.get("fast_dev_run", False):
        problems.append(
            "trainer.max_steps and trainer.max_epochs are both unlimited: the run would never stop; "
            "set trainer.max_steps=N (experiments set the published iteration counts)"
        )
    return problems


def _check_loggers(cfg: DictConfig) -> list[str]:
    loggers = cfg.get("logger") or {}
    problems = []
    for name, logger in loggers.items():
        if logger is None:
            continue
        target = str(logger.get("_target_", ""))
        if target.endswith("TensorBoardLogger") and not (
            importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        ):
            problems.append(
                f"logger.{name} needs the `tensorboard` package, which is not installed: "
                "`pip install tensorboard`, or use logger=csv / logger=wandb"
            )
        if target.endswith("WandbLogger") and not _wandb_usable(logger):
            problems.append(
                f"logger.{name} (W&B) is online but no W&B credentials were found: run with "
                "WANDB_MODE=offline (no account needed; `wandb sync` later), set "
                f"logger.{name}.offline=true, run `wandb login`, or use logger=csv"
            )
    return problems


def _wandb_usable(logger: DictConfig) -> bool:
    if logger.get("offline", False):
        return True
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _check_callbacks(cfg: DictConfig) -> list[str]:
    callbacks = cfg.get("callbacks") or {}
    has_logger = any(lg is not None for lg in (cfg.get("logger") or {}).values())
    problems = []
    for name, callback in callbacks.items():
        target = str(callback.get("_target_", "")) if callback is not None else ""
        if target.endswith("LearningRateMonitor") and not has_logger:
            problems.append(
                f"callbacks.{name} (LearningRateMonitor) needs a logger but logger=none: choose "
                f"logger=csv (or wandb/tensorboard), or drop it with callbacks.{name}=null"
            )
    return problems


def _check_resume(cfg: DictConfig) -> list[str]:
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt not in {"last", "best", "hpc", "registry"} and not Path(ckpt).exists():
        return [
            f"ckpt_path={ckpt}: no such checkpoint; resume from a Lightning checkpoint such as "
            "<run>/checkpoints/last.ckpt"
        ]
    return []

"""Checks on a composed training config, run before anything is built.

:func:`find_problems` looks at the whole config in one pass and returns every problem, each with the
override that fixes it, so a misconfigured run fails in its first second with the complete list
(a missing stage I weight file, LPIPS without its VGG16 file, ``trainer=ddp`` with one device, a
typo'd path) instead of one problem per attempt, or after the data loaders have started, or after
hours of training. The checks know which stage the config trains (``model._target_``), so each
stage is told what it needs. :func:`check_config` raises :class:`ConfigError` with the list; the
commands print it without a traceback and exit with status 2.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .losses.perceptual import VGG16_FILE

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
    "discriminator_from": "discriminator weights",
    "perceptual_weights": "VGG16 weights of the perceptual loss",
    "perceptual_linear_weights": "LPIPS head weights of the perceptual loss",
}
#: values of path keys that name no file
_NOT_FILES = {"random"}

#: The stage module classes (``model._target_``'s last part) -> the stage's name in messages.
STAGES = {"VQGANModule": "stage I", "CodePredictorModule": "stage II", "CFTModule": "stage III"}
#: What ``model.autoencoder`` is for, per stage that needs one.
AUTOENCODER_ROLE = {
    "stage II": "stage II trains on the codes of a frozen stage I autoencoder, which also gives its codebook "
    "and decoder",
    "stage III": "stage III computes its target codes with the frozen stage I autoencoder",
}
_STAGE_I_EXPORT = "/path/to/vqgan.safetensors"


class ConfigError(ValueError):
    """The composed config cannot run; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(
            f"The configuration cannot run ({count}):\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


def check_config(cfg: DictConfig, pending_files: Collection[str] = ()) -> None:
    """Raise :class:`ConfigError` listing every problem of a training config (or return silently).

    ``pending_files``: paths that do not exist yet but will (an earlier pipeline stage writes them).
    """
    problems = find_problems(cfg, pending_files)
    if problems:
        raise ConfigError(problems)


def find_problems(cfg: DictConfig, pending_files: Collection[str] = ()) -> list[str]:
    """Every problem of a training config, each ending with ``Fix:`` and the overrides that fix it (in
    backticks; nothing else in a message is in backticks)."""
    return [
        *_check_paths(cfg, {str(p) for p in pending_files}),
        *_check_stage_inputs(cfg),
        *_check_perceptual(cfg),
        *_check_sizes(cfg),
        *_check_trainer(cfg),
        *_check_loggers(cfg),
        *_check_callbacks(cfg),
        *_check_resume(cfg),
    ]


def stage_of(cfg: DictConfig) -> str | None:
    """``stage I`` / ``stage II`` / ``stage III`` for a config of one of the stage modules, else None."""
    target = str(OmegaConf.select(cfg, "model._target_", default="") or "")
    return STAGES.get(target.rsplit(".", 1)[-1])


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


def _check_paths(cfg: DictConfig, pending: set[str]) -> list[str]:
    problems = []
    for group in ("data", "model"):
        if cfg.get(group) is None:
            continue
        for dotted, key, value in _walk(cfg[group], group):
            if key not in PATH_KEYS and not key.endswith("_path"):
                continue
            if value is None or value == "???" or not isinstance(value, str) or value in _NOT_FILES:
                continue
            if not Path(value).exists() and value not in pending:
                what = PATH_KEYS.get(key, "file")
                problems.append(
                    f"{dotted}={value}: no such file or folder ({what}). Fix: `{dotted}=/path/to/{what_file(key)}`"
                )
    data = cfg.get("data")
    sources = ("train_dir", "train_lmdb", "train_shards")
    if data is not None and set(sources) & set(data.keys()):
        if all(data.get(key) is None for key in sources):
            problems.append(
                "no training data. Fix: `data.train_dir=/path/to/aligned_faces` (a folder of 512x512 aligned faces "
                "such as FFHQ), `data=lmdb data.train_lmdb=/path/to/train.lmdb` or "
                "`data=streaming data.train_shards=/path/or/uri/of/shards`"
            )
    return problems


def what_file(key: str) -> str:
    """A placeholder file name for the fix of a missing ``key``."""
    return {
        "train_dir": "aligned_faces",
        "val_dir": "aligned_faces",
        "train_lmdb": "train.lmdb",
        "val_lmdb": "val.lmdb",
        "pretrained": "vqgan_code1024.pth",
        "autoencoder": "vqgan.safetensors",
        "init_from": "code_predictor.safetensors",
        "discriminator_from": "vqgan_discriminator.safetensors",
        "perceptual_weights": VGG16_FILE,
        "perceptual_weights_path": VGG16_FILE,
        "latent_codes": "latent_codes.pth",
    }.get(key, key.removesuffix("_path"))


def _check_stage_inputs(cfg: DictConfig) -> list[str]:
    """The weight files a stage cannot start without, told in that stage's terms."""
    stage, model = stage_of(cfg), cfg.get("model")
    if stage not in AUTOENCODER_ROLE or model is None:
        return []
    problems = []
    latent_codes = OmegaConf.select(cfg, "data.latent_codes", default=None)
    if model.get("autoencoder") is None and not (latent_codes and model.get("init_from")):
        alternative = (
            "data.latent_codes=/path/to/latent_codes.pth model.init_from=/path/to/codeformer.safetensors"
        )
        problems.append(
            f"model.autoencoder is not set: {AUTOENCODER_ROLE[stage]}. Fix: `model.autoencoder={_STAGE_I_EXPORT}` "
            "(stage I's export, <run>/weights/vqgan.safetensors, or the published vqgan_code1024.pth), or "
            f"`{alternative}`; or train all stages in sequence with codeformer-pipeline"
        )
    discriminator_needed = (
        stage == "stage III"
        and "discriminator_from" in model
        and model.get("discriminator") is not None
        and float(model.get("gan_weight", 0) or 0) > 0
    )
    if discriminator_needed and model.get("discriminator_from") is None:
        problems.append(
            "model.discriminator_from is not set: the published stage III starts its discriminator from stage I's. "
            "Fix: `model.discriminator_from=/path/to/vqgan_discriminator.safetensors` (stage I exports it next to "
            "its weights), or `model.discriminator_from=random` for random weights"
        )
    return problems


def _hub_vgg16() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _check_perceptual(cfg: DictConfig) -> list[str]:
    """LPIPS needs torchvision's VGG16 file, which is never downloaded: report its absence now."""
    problems = []
    for prefix in ("model.loss", "model"):
        node = OmegaConf.select(cfg, prefix, default=None)
        if not isinstance(node, DictConfig) or "perceptual_weight" not in node:
            continue
        key = "perceptual_weights_path" if "perceptual_weights_path" in node else "perceptual_weights"
        if (
            float(node.get("perceptual_weight") or 0) > 0
            and node.get(key) is None
            and not _hub_vgg16().is_file()
        ):
            problems.append(
                f"{prefix}.perceptual_weight={node.perceptual_weight} needs torchvision's VGG16 ImageNet weights "
                f"{VGG16_FILE}, which are never downloaded, and {prefix}.{key} is not set (nor is the file in the "
                f"torch hub cache, {_hub_vgg16()}). Fix: `{prefix}.{key}=/path/to/{VGG16_FILE}`, or "
                f"`{prefix}.perceptual_weight=0` to train without the perceptual loss"
            )
    return problems


def _check_sizes(cfg: DictConfig) -> list[str]:
    data_size = OmegaConf.select(cfg, "data.image_size", default=None)
    net_size = OmegaConf.select(cfg, "model.net.img_size", default=None)
    if data_size is not None and net_size is not None and int(data_size) != int(net_size):
        return [
            f"data.image_size={data_size} but model.net.img_size={net_size}: the network sees images of one "
            f"size (the tiny models use 32 or 64, the published ones 512). Fix: `model.net.img_size={data_size}` "
            f"or `data.image_size={net_size}`"
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
        return ["no trainer config. Fix: `trainer=cpu` (or gpu, ddp, ddp_cpu, multinode)"]
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
                f"trainer.accelerator={accelerator} but no CUDA device is visible. Fix: `trainer=cpu` "
                "(or `trainer=ddp_cpu` to try the distributed code paths on CPU)"
            )
        elif n_devices is not None and n_devices > available and "SLURM_JOB_ID" not in os.environ:
            problems.append(
                f"trainer.devices={n_devices} but this machine has {available} GPU(s). Fix: `trainer.devices={available}`"
            )
    if _is_distributed(strategy) and n_devices == 1 and num_nodes == 1:
        problems.append(
            "a distributed strategy (trainer=ddp / ddp_cpu / multinode) with trainer.devices=1 and "
            "trainer.num_nodes=1 runs one process. Fix: `trainer.devices=2` (or more), or `trainer=gpu` / `trainer=cpu`"
        )
    if num_nodes > 1 and not _is_distributed(strategy):
        problems.append(
            f"trainer.num_nodes={num_nodes} needs a distributed strategy. Fix: `trainer=multinode`"
        )
    if accelerator == "cpu" and str(trainer.get("precision", "32-true")) in {"16-mixed", "16"}:
        problems.append(
            "trainer.precision=16-mixed is not supported on CPU. Fix: `trainer.precision=bf16-mixed` or "
            "`trainer.precision=32-true`"
        )
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs", None)
    unlimited = (max_steps is None or max_steps < 0) and (max_epochs is not None and max_epochs < 0)
    if unlimited and not trainer.get("fast_dev_run", False):
        problems.append(
            "trainer.max_steps and trainer.max_epochs are both unlimited: the run would never stop "
            "(the experiments set the published iteration counts). Fix: `trainer.max_steps=1000` (any N)"
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
                f"logger.{name} needs the tensorboard package, which is not installed (pip install tensorboard). "
                "Fix: `logger=csv` (or `logger=wandb`)"
            )
        if target.endswith("WandbLogger") and not _wandb_usable(logger):
            problems.append(
                f"logger.{name} (W&B) is online but no W&B credentials were found. Fix: "
                f"`logger.{name}.offline=true` (no account needed; upload later with wandb sync), or `logger=csv`; "
                "or set WANDB_MODE=offline, or run wandb login first"
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
                f"callbacks.{name} (LearningRateMonitor) needs a logger but logger=none. Fix: `logger=csv` "
                f"(or wandb, tensorboard), or `callbacks.{name}=null`"
            )
    return problems


def _check_resume(cfg: DictConfig) -> list[str]:
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt not in {"last", "best", "hpc", "registry"} and not Path(ckpt).exists():
        return [
            f"ckpt_path={ckpt}: no such checkpoint. Fix: `ckpt_path=/path/to/run/checkpoints/last.ckpt` (a run's "
            "Lightning checkpoint), `ckpt_path=auto` (the newest one of this run's folder) or `ckpt_path=null`"
        ]
    return []

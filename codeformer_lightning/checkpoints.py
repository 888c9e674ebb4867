"""Loading, saving and converting weight files.

Two formats:

* the **published** CodeFormer ``.pth`` files (``codeformer.pth``, ``vqgan_code1024.pth``, ...): a dict
  with ``params_ema`` / ``params`` / ``params_d`` (or a bare state dict) in the published flat key
  layout (``encoder.blocks.N``). Read with ``torch.load(weights_only=True)``.
* **native** ``.safetensors`` files written by :func:`save_weights`: this package's key layout, the
  constructor config in the metadata. No pickle involved.

It also reads the **Lightning checkpoints** of the training stages (``<run>/checkpoints/last.ckpt``):
they record each network's class and constructor config under :data:`LIGHTNING_KEY` (see
:mod:`codeformer_lightning.models.stage`), and the trained network is the one the stage exports (its
EMA copy).

:func:`load_pretrained` reads any of them and returns the right module in eval mode;
:func:`convert_checkpoint` (command ``codeformer-convert``) converts between them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .nn import CodeFormer, PatchDiscriminator, VQAutoEncoder

NATIVE_FORMAT = "codeformer_lightning"
#: what a CodeFormer's weights are for (published inference settings per task); written into exports
CODEFORMER_VARIANTS = ("restoration", "colorization", "inpainting")
#: Key of a stage module's Lightning checkpoint that records its networks: ``{"module": class name,
#: "export": state-dict prefix of the exported network, "networks": {argument: spec or None},
#: "targets": spec or None}``, a spec being ``{"class": name, "config": constructor kwargs}``.
LIGHTNING_KEY = "codeformer_lightning"
#: Extra top-level key in published-layout files we write: the architecture of non-published sizes.
CONFIG_KEY = "codeformer_lightning_config"
_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "CodeFormer": CodeFormer,
    "VQAutoEncoder": VQAutoEncoder,
    "PatchDiscriminator": PatchDiscriminator,
}  # the classes a weight file can hold; chosen from the file's tensors, never from user strings
# Published names of the restoration network's non-autoencoder parts -> ours.
_PREFIX_RENAMES = {
    "ft_layers.": "transformer.",
    "feat_emb.": "feat_proj.",
    "idx_pred_layer.": "code_head.",
    "fuse_convs_dict.": "fusion.",
}


class CheckpointError(RuntimeError):
    """A weight file could not be read or does not fit the model; the message names the file."""


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` learnt about a weight file.

    kind: ``"CodeFormer"``, ``"VQAutoEncoder"`` or ``"PatchDiscriminator"``.
    variant: ``restoration`` / ``colorization`` / ``inpainting`` / ``autoencoder`` / ``discriminator``
    (``custom`` for CodeFormer sizes other than the published ones).
    layout: ``"published"`` or ``"native"``. source_key: the top-level key the weights came from.
    """

    path: str
    kind: str
    variant: str
    layout: str
    source_key: str | None
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- key layout conversion
def _flat_prefix_map(model: nn.Module) -> dict[str, str]:
    """``{"encoder.blocks.7.": "encoder.levels.2.res.0.", ...}`` for this model's architecture."""
    names = {id(m): n for n, m in model.named_modules()}
    mapping: dict[str, str] = {}
    for part in ("encoder", "generator"):
        sub = getattr(model, part, None)
        if sub is None:
            continue
        for i, module in enumerate(sub.flat_modules()):
            mapping[f"{part}.blocks.{i}."] = names[id(module)] + "."
    for published, ours in _PREFIX_RENAMES.items():
        mapping[published] = ours
    return mapping


def _rename(state: Mapping[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    # Longest prefixes first so that "encoder.blocks.1." never captures "encoder.blocks.12.".
    prefixes = sorted(mapping, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = mapping[p] + key[len(p) :]
                break
        out[key] = value
    return out


def published_to_native(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a published-layout state dict to ``model``'s own keys."""
    return _rename(state, _flat_prefix_map(model))


def native_to_published(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``model``'s own keys to the published layout."""
    return _rename(state, {v: k for k, v in _flat_prefix_map(model).items()})


# ----------------------------------------------------------------------------- reading files
def _torch_load(path: Path, map_location) -> Mapping:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; all mean the same to the user
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch weight file ({type(exc).__name__}: {exc}). Expected a "
            "published CodeFormer .pth (a dict with 'params_ema', 'params' or 'params_d'), a Lightning "
            "checkpoint of a codeformer_lightning stage or a .safetensors file written by codeformer_lightning. "
            "Is the file complete (not truncated)?"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of weights")
    return obj


def _read_published(path: Path, obj: Mapping) -> tuple[dict[str, torch.Tensor], str | None, dict | None]:
    config = obj.get(CONFIG_KEY)
    for key in ("params_ema", "params", "params_d"):
        if key in obj and isinstance(obj[key], Mapping):
            state, source = obj[key], key
            break
    else:
        state, source = obj, None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {_key_list(obj)}); expected 'params_ema', 'params', "
            "'params_d', a bare state dict, or a Lightning checkpoint of a codeformer_lightning stage"
        )
    return tensors, source, config


def _key_list(obj: Mapping, limit: int = 40) -> str:
    """Every top-level key (up to ``limit``): the telling one (``state_dict``, ``params``) is never cut."""
    keys = sorted(map(str, obj))
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _count_indexed(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _infer_published(path: Path, state: Mapping[str, torch.Tensor], config: dict | None) -> CheckpointInfo:
    keys = set(state)
    if any(k.startswith("main.") for k in keys):
        cfg = dict(config or {})
        if not cfg:
            n_bn = sum(1 for k in keys if k.endswith("running_mean"))
            cfg = dict(in_channels=state["main.0.weight"].shape[1], ndf=state["main.0.weight"].shape[0], n_layers=n_bn)
        return CheckpointInfo(str(path), "PatchDiscriminator", "discriminator", "published", None, cfg)
    if "quantize.embedding.weight" not in keys or not any(k.startswith("encoder.") for k in keys):
        raise CheckpointError(
            f"{path}: not a CodeFormer weight file: expected 'quantize.embedding.weight' and 'encoder.blocks.*' "
            f"(restoration / autoencoder) or 'main.*' (discriminator); found keys like {sorted(keys)[:6]}"
        )
    codebook_size, emb_dim = state["quantize.embedding.weight"].shape
    cfg = dict(config or {})
    cfg.setdefault("codebook_size", int(codebook_size))
    cfg.setdefault("emb_dim", int(emb_dim))
    cfg.setdefault("nf", int(state["encoder.blocks.0.weight"].shape[0]))
    if "position_emb" not in keys:
        return CheckpointInfo(str(path), "VQAutoEncoder", "autoencoder", "published", None, _ae_only(cfg))
    fusion = sorted({int(m.group(1)) for k in keys if (m := re.match(r"fuse_convs_dict\.(\d+)\.", k))})
    cfg.setdefault("fusion_resolutions", fusion)
    cfg.setdefault("dim_embd", int(state["position_emb"].shape[1]))
    cfg.setdefault("n_layers", _count_indexed(state, r"ft_layers\.(\d+)\."))
    if "ft_layers.0.linear1.weight" in keys:
        cfg.setdefault("dim_mlp", int(state["ft_layers.0.linear1.weight"].shape[0]))
    return CheckpointInfo(str(path), "CodeFormer", _codeformer_variant(cfg), "published", None, cfg)


def _codeformer_variant(cfg: Mapping) -> str:
    """The published model a CodeFormer config has the shape of, or ``custom``."""
    if cfg.get("img_size", 512) == 512 and cfg.get("nf") == 64:
        codebook_size, fusion = cfg.get("codebook_size"), sorted(cfg.get("fusion_resolutions", []))
        if codebook_size == 1024 and fusion == [32, 64, 128, 256]:
            return "restoration"
        if codebook_size == 1024 and fusion == [32, 64, 128]:
            return "colorization"
        if codebook_size == 512 and fusion == [32, 64, 128]:
            return "inpainting"
    return "custom"


def _ae_only(cfg: dict) -> dict:
    allowed = {"img_size", "nf", "ch_mult", "res_blocks", "attn_resolutions", "codebook_size", "emb_dim", "beta", "norm_groups", "l2_normalize"}
    return {k: v for k, v in cfg.items() if k in allowed}


def _read_native(path: Path, map_location) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        device = map_location if isinstance(map_location, str) else "cpu"
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({exc}); is it truncated?") from exc
    if meta.get("format") != NATIVE_FORMAT or meta.get("class") not in _MODEL_CLASSES:
        raise CheckpointError(
            f"{path}: a safetensors file but not one written by codeformer_lightning.save_weights "
            f"(metadata {dict(list(meta.items())[:4])}); expected format={NATIVE_FORMAT!r} and class in "
            f"{sorted(_MODEL_CLASSES)}"
        )
    config = json.loads(meta.get("config", "{}"))
    variant = meta.get("variant") or {"VQAutoEncoder": "autoencoder", "PatchDiscriminator": "discriminator"}.get(
        meta["class"], "custom"
    )
    return state, CheckpointInfo(str(path), meta["class"], variant, "native", None, config)


# ----------------------------------------------------------------------------- Lightning checkpoints
def _plain(config: Mapping) -> dict:
    # JSON-able types only (lists, not tuples or config containers): torch.load(weights_only=True) reads them
    return json.loads(json.dumps(dict(config)))


def network_spec(class_name: str, config: Mapping) -> dict:
    """``{"class": class_name, "config": config}`` in plain Python types (what checkpoints record)."""
    return {"class": class_name, "config": _plain(config)}


def describe_network(module: nn.Module | None) -> dict | None:
    """The spec of ``module`` (a network or loss with a constructor ``config``), None for None."""
    if module is None:
        return None
    if not isinstance(getattr(module, "config", None), Mapping):
        raise TypeError(f"{type(module).__name__} has no constructor config to record in a checkpoint")
    return network_spec(type(module).__name__, module.config)


def build_network(spec: Mapping, source: str, extra_classes: Mapping[str, type[nn.Module]] | None = None) -> nn.Module:
    """Build the module a spec describes (random weights); the class is looked up, never imported by name."""
    classes = {**_MODEL_CLASSES, **(extra_classes or {})}
    name = spec.get("class") if isinstance(spec, Mapping) else None
    if name not in classes:
        raise CheckpointError(f"{source}: unknown network class {name!r}; expected one of {sorted(classes)}")
    try:
        return classes[name](**spec.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot build {name} from its config {spec.get('config')}: {exc}") from exc


def read_lightning_record(checkpoint: Mapping, source: str, expected: str | None = None) -> dict:
    """The network record (:data:`LIGHTNING_KEY`) of a stage module's Lightning checkpoint.

    ``expected``: the module class the caller rebuilds; a checkpoint of another stage is an error.
    """
    record = checkpoint.get(LIGHTNING_KEY)
    if not isinstance(record, Mapping) or not isinstance(record.get("networks"), Mapping):
        raise CheckpointError(
            f"{source}: a Lightning checkpoint without codeformer_lightning's network record ('{LIGHTNING_KEY}'; "
            f"top-level keys: {_key_list(checkpoint)}): written by another LightningModule, or by a stage module "
            "of a codeformer_lightning version before the record existed. Build the module with its networks and "
            "load the weights with XModule.load_from_checkpoint(path, net=..., ...)"
        )
    if expected is not None and record.get("module") != expected:
        raise CheckpointError(
            f"{source}: a checkpoint of {record.get('module')}, not of {expected}: use "
            f"{record.get('module')}.load_from_checkpoint, or load_pretrained for the trained network"
        )
    return dict(record)


def _read_lightning(path: Path, checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The network a stage exports (the EMA copy) from its Lightning checkpoint."""
    record = read_lightning_record(checkpoint, str(path))
    spec, prefix = record["networks"].get("net"), str(record.get("export", ""))
    if not isinstance(spec, Mapping) or spec.get("class") not in _MODEL_CLASSES:
        raise CheckpointError(f"{path}: the checkpoint records no loadable network (net: {spec!r})")
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: its state dict holds no '{prefix}*' weights (the network the stage exports)")
    kind, config = spec["class"], dict(spec.get("config", {}))
    variant = {"VQAutoEncoder": "autoencoder", "PatchDiscriminator": "discriminator"}.get(kind)
    variant = variant or record.get("variant") or _codeformer_variant(config)  # the stage's variant, if recorded
    info = CheckpointInfo(str(path), kind, variant, "native", f"state_dict:{prefix}", config)
    return state, info


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _read(path: str | Path, map_location) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if _is_safetensors(path):
        return _read_native(path, map_location)
    obj = _torch_load(path, map_location)
    if "state_dict" in obj and "pytorch-lightning_version" in obj:
        return _read_lightning(path, obj)
    state, source, config = _read_published(path, obj)
    if any(k.startswith(("encoder.levels.", "encoder.conv_in.")) for k in state):
        raise CheckpointError(
            f"{path}: holds weights in codeformer_lightning's own key layout without an architecture; "
            "write such files with codeformer_lightning.save_weights (.safetensors) or save_published (.pth)"
        )
    info = _infer_published(path, state, config)
    info.source_key = source
    if config and info.kind == "CodeFormer":
        info.variant = config.get("variant", info.variant)
    return state, info


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Identify a weight file's model class, variant and layout without building the model."""
    return _read(path, "cpu")[1]


# ----------------------------------------------------------------------------- building models
def _build(info: CheckpointInfo) -> nn.Module:
    cls = _MODEL_CLASSES[info.kind]
    cfg = dict(info.config)
    cfg.pop("variant", None)
    if cls is VQAutoEncoder:
        cfg = _ae_only(cfg)
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{info.path}: cannot build {info.kind} from its config {cfg}: {exc}") from exc


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with an error that names ``source`` and every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [f"{source}: weights do not fit {type(model).__name__}({getattr(model, 'config', '')})"]
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {head(shapes)}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load any CodeFormer weight file and return the right module in eval mode.

    Accepts the published ``.pth`` files (``params_ema``, ``params``, ``params_d`` or bare state
    dicts: restoration, colorization, inpainting, autoencoder, discriminator), this package's
    ``.safetensors`` files and Lightning checkpoints of its training modules. The variant found is
    in ``model.variant``. Raises :class:`CheckpointError` naming the file and what did not fit.
    """
    state, info = _read(path, map_location)
    model = _build(info)
    if info.layout == "published":
        state = published_to_native(state, model)
    load_state_strict(model, state, str(path))
    model.variant = info.variant  # type: ignore[attr-defined]
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- writing files
def _class_name(model: nn.Module) -> str:
    for name, cls in _MODEL_CLASSES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"can only save {sorted(_MODEL_CLASSES)}, got {type(model).__name__}")


def check_variant(variant: str | None) -> str | None:
    """``variant`` if it names a CodeFormer task (or is None); else ValueError listing the valid ones."""
    if variant is not None and variant not in CODEFORMER_VARIANTS:
        raise ValueError(f"variant must be one of {list(CODEFORMER_VARIANTS)} (or null), got {variant!r}")
    return variant


def save_weights(model: nn.Module, path: str | Path, variant: str | None = None) -> Path:
    """Write ``model`` as a native ``.safetensors`` file (weights + constructor config)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": NATIVE_FORMAT,
        "class": _class_name(model),
        "config": json.dumps(model.config),
        "variant": variant or getattr(model, "variant", None) or "",
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return path


def save_published(model: nn.Module, path: str | Path, key: str | None = None) -> Path:
    """Write ``model`` in the published ``.pth`` layout (readable by the published code).

    ``key`` defaults to ``params_d`` for a discriminator and ``params_ema`` otherwise. The
    architecture is stored under an extra top-level key the published loader ignores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = key or ("params_d" if isinstance(model, PatchDiscriminator) else "params_ema")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not isinstance(model, PatchDiscriminator):
        state = native_to_published(state, model)
    config = dict(model.config)
    if getattr(model, "variant", None):
        config["variant"] = model.variant
    torch.save({key: state, CONFIG_KEY: config}, path)
    return path


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Convert a weight file (published ``.pth``, ``.safetensors`` or a stage's Lightning ``.ckpt``: its
    exported network) to native ``.safetensors`` or the published ``.pth`` layout (by ``dst``'s suffix)."""
    model = load_pretrained(src)
    if Path(dst).suffix == ".safetensors":
        return save_weights(model, dst)
    return save_published(model, dst)


def convert_main(argv: list[str] | None = None) -> int:
    """``codeformer-convert SRC DST`` or ``codeformer-convert --info FILE``."""
    parser = argparse.ArgumentParser(
        prog="codeformer-convert",
        description="Convert CodeFormer weights between the published .pth layout and .safetensors, turn a "
        "training checkpoint (.ckpt: the network the stage exports, EMA weights) into a weight file, or describe "
        "a weight file.",
    )
    parser.add_argument("src", help="weight file to read (.pth published layout, .safetensors, or a stage's .ckpt)")
    parser.add_argument("dst", nargs="?", help="file to write: .safetensors (native) or .pth (published)")
    parser.add_argument("--info", action="store_true", help="only print what SRC holds")
    args = parser.parse_args(argv)
    try:
        if args.info or not args.dst:
            info = inspect_checkpoint(args.src)
            print(json.dumps(info.__dict__, indent=2))
            return 0
        out = convert_checkpoint(args.src, args.dst)
    except CheckpointError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}")
    return 0

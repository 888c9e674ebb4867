"""The config files themselves: each number is written in one place.

Every YAML file under ``conf/`` is parsed and each numeric leaf is placed where it lands in the
composed config: the file's package (``# @package`` header, else its config group: ``model/net/x.yaml``
-> ``model.net``) plus the key path inside the file. Two files that write the same number at the same
composed key are restating one value: a default an experiment repeats (``data.image_size: 512``),
a block copied between siblings (the network of three stage configs, the tiny architecture), a sweep
setting shared by two sweeps. Each such value belongs in one file that the others compose with
(a config group, a base config) or reach by interpolation (``${model.net.img_size}``).

Not counted: 0, 1, 0.0, 1.0 and -1 (off / on / identity / unlimited: "no weight decay", "every step",
"weight 1", "no step limit" are switches, not tuned numbers), booleans, null and strings. Two values that are equal by coincidence,
not by meaning, are listed in COINCIDENCES with the reason; an entry that no longer occurs fails too.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

CONF = Path(__file__).resolve().parents[2] / "conf"
TRIVIAL = {0, 1, -1}

_PUBLISHED = "two published option files set this value independently"
#: (composed key, value) -> why equal values in several files are independent choices
COINCIDENCES: dict[tuple[str, str], str] = {
    ("callbacks.model_checkpoint.every_n_train_steps", "5000"): (
        "the callbacks' generic default cadence and the published stage III checkpoint cadence"
    ),
    ("data.batch_size", "3"): f"{_PUBLISHED}: stage III (8 GPUs x 3) and inpainting (4 GPUs x 3)",
    ("model.ce_weight", "0.5"): f"{_PUBLISHED}: stage II and stage III cross-entropy weights",
    ("model.ema_decay", "0.995"): f"{_PUBLISHED}: stage I and stage II EMA decays",
    ("model.optimizer.lr", "7e-05"): f"{_PUBLISHED}: stage I and inpainting learning rates",
    ("model.d_optimizer.lr", "7e-05"): f"{_PUBLISHED}: stage I and inpainting discriminator rates",
    ("model.scheduler.gamma", "0.5"): f"{_PUBLISHED}: the stage II and inpainting schedules both halve",
    ("trainer.log_every_n_steps", "10"): "debug=overfit's logging and the quickstart stages' logging",
    ("model.net.attn_resolutions", "[16]"): (
        "attention on the latent, 16x16 both in the published autoencoder and in the quickstart's"
    ),
}


def package_of(path: Path, text: str, conf: Path = CONF) -> str:
    """Where the file's keys land: its ``# @package`` header, else its group (folder) path."""
    for line in text.splitlines():
        if line.startswith("# @package"):
            package = line.split(maxsplit=2)[2].strip()
            group = ".".join(path.relative_to(conf).parent.parts)
            return {"_global_": "", "_group_": group}.get(package, package)
        if line.strip() and not line.startswith("#"):
            break
    return ".".join(path.relative_to(conf).parent.parts)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_numbers(value: object) -> bool:
    if isinstance(value, list):
        return any(_has_numbers(v) for v in value)
    return _is_number(value)


def _trivial(value: object) -> bool:
    if isinstance(value, list):
        return all(_trivial(v) for v in value)
    return not _is_number(value) or value in TRIVIAL


def numeric_leaves(node: object, prefix: str) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every number or list holding numbers under ``node``."""
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            if prefix == "" and key == "defaults":
                continue
            out.extend(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if _has_numbers(node) and not _trivial(node):
        return [(prefix, node)]
    return []


def repeated_numbers(conf: Path) -> dict[tuple[str, str], list[str]]:
    """``(composed key, value) -> [files]`` for every non-trivial number written in two or more files."""
    where: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(conf.rglob("*.yaml")):
        text = path.read_text()
        tree = yaml.safe_load(text) or {}
        package = package_of(path, text, conf)
        for key, value in numeric_leaves(tree, ""):
            full = f"{package}.{key}" if package else key
            where[(full, repr(value))].add(str(path.relative_to(conf)))
    return {k: sorted(v) for k, v in sorted(where.items()) if len(v) > 1}


def test_the_detector_finds_restated_values_and_ignores_switches(tmp_path):
    (tmp_path / "model" / "net").mkdir(parents=True)
    (tmp_path / "experiment").mkdir()
    (tmp_path / "model" / "net" / "big.yaml").write_text("img_size: 512\nnf: 64\nlr: 1.0\n")
    (tmp_path / "model" / "other.yaml").write_text("net:\n  img_size: 512\n  nf: 32\nsteps: [0, 1]\n")
    (tmp_path / "experiment" / "x.yaml").write_text(
        "# @package _global_\n# a comment\nmodel:\n  net:\n    nf: 64\n  steps: [0, 1]\ndata:\n  img_size: 512\n"
    )
    found = repeated_numbers(tmp_path)
    assert found == {
        ("model.net.img_size", "512"): ["model/net/big.yaml", "model/other.yaml"],
        ("model.net.nf", "64"): ["experiment/x.yaml", "model/net/big.yaml"],
    }


def test_no_number_is_written_twice_in_conf():
    repeated = repeated_numbers(CONF)
    unexplained = {k: v for k, v in repeated.items() if k not in COINCIDENCES}
    lines = [f"{key} = {value}: {', '.join(files)}" for (key, value), files in unexplained.items()]
    assert not unexplained, "numbers written in several files (write each once):\n" + "\n".join(lines)


@pytest.mark.parametrize("entry", sorted(COINCIDENCES))
def test_listed_coincidences_still_occur(entry):
    assert entry in repeated_numbers(CONF), f"{entry} is no longer repeated: remove it from COINCIDENCES"


# ----------------------------------------------------------------------------- the composed structure
AUTOENCODER_KEYS = (
    "img_size",
    "nf",
    "ch_mult",
    "res_blocks",
    "attn_resolutions",
    "codebook_size",
    "emb_dim",
    "beta",
    "norm_groups",
    "l2_normalize",
)


@pytest.mark.parametrize(
    "stage_one, later",
    [
        ("vqgan", "code_predictor"),
        ("vqgan", "cft"),
        ("vqgan", "colorization"),
        ("quickstart_vqgan", "quickstart_code_predictor"),
        ("quickstart_vqgan", "quickstart_cft"),
    ],
)
def test_later_stages_build_on_the_stage_one_autoencoder(compose_cfg, stage_one, later):
    """Stages II/III load stage I's export: their network's autoencoder part must be the same network.
    One net config per size makes this hold by construction; the test keeps it so."""
    first, second = (
        compose_cfg(f"experiment={stage_one}").model.net,
        compose_cfg(f"experiment={later}").model.net,
    )
    assert first._target_.endswith("VQAutoEncoder") and second._target_.endswith("CodeFormer")
    assert {k: second[k] for k in AUTOENCODER_KEYS} == {k: first[k] for k in AUTOENCODER_KEYS}


@pytest.mark.parametrize(
    "overrides, size",
    [
        (["model=vqgan_tiny"], 32),
        (["model=cft", "data=sample_faces"], 512),
        (["experiment=quickstart"], 32),
        (["experiment=inpainting"], 512),
        (["experiment=vqgan", "model/net=vqgan_tiny"], 32),
    ],
)
def test_the_data_size_follows_the_network(compose_cfg, overrides, size):
    cfg = compose_cfg(*overrides)
    assert cfg.data.image_size == cfg.model.net.img_size == size


def test_one_group_choice_changes_the_network_everywhere(compose_cfg):
    """model/net, model/discriminator and the optimiser are groups: one override swaps the whole block."""
    cfg = compose_cfg("experiment=cft", "model/net=codeformer_tiny", "model/discriminator=patchgan_tiny")
    assert (cfg.model.net.img_size, cfg.model.net.n_layers, cfg.model.discriminator.ndf) == (32, 2, 16)
    assert cfg.model.net._target_ == "codeformer_lightning.nn.CodeFormer"
    tiny = compose_cfg("model=cft_tiny").model
    assert tiny.d_optimizer.lr == tiny.optimizer.lr == 1.0e-3 and tiny.scheduler is None
    assert tiny.optimizer.betas == compose_cfg("model=vqgan").model.d_optimizer.betas == [0.9, 0.99]

"""``docs/recipe.md`` against the composed Hydra configs, so the recipe table cannot drift.

The document has one table per published option file (``options/*.yml`` of the published code),
each composed as its "Composed with:" line says (``train`` with ``experiment=<x>`` and the published
hardware). Every row names a published option, its published value, our config key (``group:field``
= a field of the degradation preset that ``group`` names), our value and a status:

* every row with a key: our value equals the composed config's value at that key;
* ``same``: our value equals the published value;
* ``deviation``: the option is listed, with its reason, under "Deviations";
* ``equivalent`` / ``fixed`` / ``launch`` / ``n/a``: a note says why (another spelling of the same
  setting, built into the code, set on the command line, without effect here).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from codeformer_lightning.data.degradations import preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
PUBLISHED_FILES = (
    "VQGAN_512_ds32_nearest_stage1",
    "CodeFormer_stage2",
    "CodeFormer_stage3",
    "CodeFormer_colorization",
    "CodeFormer_inpainting",
)
STATUSES = {"same", "equivalent", "launch", "fixed", "n/a", "deviation"}
NONE = "—"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Row:
    option: str
    published: str
    key: str
    ours: str
    status: str
    note: str


@dataclass
class Section:
    published_file: str
    overrides: list[str]
    rows: list[Row]


def _code(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) > 1 and cell.startswith("`") and cell.endswith("`") else cell


def parse_doc(text: str) -> tuple[list[Section], str]:
    """The option tables and the text of the Deviations section."""
    sections: list[Section] = []
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        match = re.match(r".*`options/(\w+)\.yml`", block.splitlines()[0])
        if not match:
            continue
        composed = re.search(r"^Composed with: `([^`]*)`", block, flags=re.M)
        assert composed, f"section {match.group(1)} has no 'Composed with:' line"
        rows = []
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("| `") or len(cells) != 6:
                continue
            rows.append(Row(_code(cells[0]), cells[1], _code(cells[2]), cells[3], cells[4], cells[5]))
        sections.append(Section(match.group(1), composed.group(1).split(), rows))
    deviations = re.search(r"^## Deviations\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return sections, deviations.group(1) if deviations else ""


def parse_value(cell: str):
    """A table cell (`yaml`) as a Python value; number-like strings (YAML 1.1's ``7e-05``) as floats."""

    def numbers(value):
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return float(value)
        if isinstance(value, list):
            return [numbers(v) for v in value]
        return value

    return numbers(yaml.safe_load(_code(cell)))


def same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


_MISSING = object()


def composed_value(cfg, key: str):
    """The value at ``key``; ``group:field`` is a field of the degradation preset named at ``group``."""
    if ":" in key:
        group, field = key.split(":")
        value = getattr(preset(OmegaConf.select(cfg, group)), field)
        return list(value) if isinstance(value, tuple) else value
    value = OmegaConf.select(cfg, key, default=_MISSING)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("codeformer_lightning.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


SECTIONS, DEVIATIONS = parse_doc(DOC.read_text())


def test_the_document_covers_the_five_published_option_files():
    assert [s.published_file for s in SECTIONS] == list(PUBLISHED_FILES)
    for section in SECTIONS:
        assert len(section.rows) >= 70, f"{section.published_file}: only {len(section.rows)} options"
        options = [r.option for r in section.rows]
        assert len(options) == len(set(options)), f"{section.published_file}: an option is listed twice"
        bad = [(r.option, r.status) for r in section.rows if r.status not in STATUSES]
        assert not bad, f"{section.published_file}: unknown statuses {bad}"
    assert DEVIATIONS.strip(), "docs/recipe.md has no Deviations section"


@pytest.mark.parametrize("section", SECTIONS, ids=[s.published_file for s in SECTIONS])
def test_the_table_matches_the_composed_config(section):
    cfg = _compose(section.overrides)
    problems = []
    for row in section.rows:
        where = f"{section.published_file} `{row.option}`"
        if row.status != "same" and len(row.note) < 10:
            problems.append(f"{where}: status {row.status} without a note saying why")
        if row.status == "deviation" and f"`{row.option}`" not in DEVIATIONS:
            problems.append(f"{where}: a deviation that the Deviations section does not list")
        if row.key == NONE:
            if row.status in ("same", "launch"):
                problems.append(f"{where}: status {row.status} needs a config key")
            continue
        value = composed_value(cfg, row.key)
        if value is _MISSING:
            problems.append(f"{where}: config key {row.key} does not exist in the composed config")
            continue
        if row.ours == NONE:
            if row.status != "launch":
                problems.append(f"{where}: no value given for {row.key}")
            continue
        if not same_value(value, parse_value(row.ours)):
            problems.append(f"{where}: the table says {row.key} = {row.ours}, the config has {value!r}")
        if row.status == "same" and not same_value(parse_value(row.ours), parse_value(row.published)):
            problems.append(f"{where}: status same, but ours {row.ours} != published {row.published}")
    assert not problems, "\n".join(problems)


def test_every_listed_deviation_gives_a_reason():
    entries = ["- " + e for e in re.split(r"^- ", DEVIATIONS, flags=re.M)[1:]]
    assert entries
    for entry in entries:
        assert re.match(r"- `[^`]+`", entry), f"a deviation must start with the option it concerns: {entry}"
        assert len(" ".join(entry.split())) > 120, f"a deviation without a reason: {entry}"

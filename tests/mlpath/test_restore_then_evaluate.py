"""Issue 13, item 8: ``codeformer-restore -w 0 0.5 1`` then ``codeformer-evaluate --restored <its output>
--gt <gt>`` reports one run per w, with the numbers of the files restore wrote."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codeformer_lightning import save_weights
from codeformer_lightning.nn import CodeFormer

NAMES = ("anna", "ben", "cleo")


def _command(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name(name)), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    """Ground-truth and degraded 32 px faces of the same names, and tiny CodeFormer weights."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for sub in ("gt", "lq"):
        (root / sub).mkdir()
    for name in NAMES:
        smooth = np.kron(rng.integers(40, 220, size=(4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(root / "gt" / f"{name}.png")
        noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "lq" / f"{name}.png")
    tiny = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=1, attn_resolutions=(4,), codebook_size=64,
                      emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))
    weights = save_weights(CodeFormer(**tiny), root / "tiny.safetensors")
    return {"gt": root / "gt", "lq": root / "lq", "weights": weights, "root": root}


def _restore(faces: dict[str, Path], out: Path, *args: str) -> None:
    done = _command("codeformer-restore", faces["lq"], "--aligned", "-o", out, "--weights", faces["weights"], *args)
    assert done.returncode == 0, done.stderr


def _runs(report: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{run: {image: {metric: value}}}`` of ``metrics.csv``."""
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for row in csv.DictReader(report.open()):
        runs.setdefault(row["run"], {})[row["image"]] = {k: float(v) for k, v in row.items()
                                                        if k in ("psnr", "ssim") and v}
    return runs


def _psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), np.float64) / 255
    y = np.asarray(Image.open(b).convert("RGB"), np.float64) / 255
    return float(10 * np.log10(1.0 / np.mean((x - y) ** 2)))


def test_evaluate_reports_each_w_of_a_restore_run(faces, tmp_path):
    out = tmp_path / "restored"
    _restore(faces, out, "-w", "0", "0.5", "1")
    assert (out / "final_results" / "anna_w0.50.png").is_file()  # the layout this test is about
    done = _command("codeformer-evaluate", "--restored", out, "--gt", faces["gt"], "--out", tmp_path / "eval",
                    "--metrics", "psnr", "ssim")
    assert done.returncode == 0, done.stderr
    runs = _runs(tmp_path / "eval" / "metrics.csv")
    assert sorted(runs) == ["w=0", "w=0.5", "w=1"]
    for w, tag in (("w=0", "0.00"), ("w=0.5", "0.50"), ("w=1", "1.00")):
        assert sorted(runs[w]) == sorted([*NAMES, "mean"])
        for name in NAMES:  # an independent PSNR of the very files restore wrote
            expected = _psnr(out / "final_results" / f"{name}_w{tag}.png", faces["gt"] / f"{name}.png")
            assert runs[w][name]["psnr"] == pytest.approx(expected, abs=1e-4), (w, name)
        assert runs[w]["mean"]["psnr"] == pytest.approx(np.mean([runs[w][n]["psnr"] for n in NAMES]), abs=1e-6)
    assert (tmp_path / "eval" / "fidelity_quality.png").is_file()  # the plot over w
    assert "| w=0.5 | 3 |" in done.stdout
    # the same from final_results/ itself
    again = _command("codeformer-evaluate", "--restored", out / "final_results", "--gt", faces["gt"],
                     "--out", tmp_path / "eval2", "--metrics", "psnr")
    assert again.returncode == 0 and sorted(_runs(tmp_path / "eval2" / "metrics.csv")) == ["w=0", "w=0.5", "w=1"]


def test_one_w_and_a_suffix(faces, tmp_path):
    _restore(faces, tmp_path / "one", "-w", "0.7")
    done = _command("codeformer-evaluate", "--restored", tmp_path / "one", "--gt", faces["gt"], "--out",
                    tmp_path / "eval_one", "--metrics", "psnr")
    assert done.returncode == 0, done.stderr
    assert sorted(_runs(tmp_path / "eval_one" / "metrics.csv")) == ["restored"]
    _restore(faces, tmp_path / "suffixed", "-w", "0", "1", "--suffix", "_v2")
    done = _command("codeformer-evaluate", "--restored", tmp_path / "suffixed", "--gt", faces["gt"], "--suffix",
                    "_v2", "--out", tmp_path / "eval_suffix", "--metrics", "psnr")
    assert done.returncode == 0, done.stderr
    assert sorted(_runs(tmp_path / "eval_suffix" / "metrics.csv")) == ["w=0", "w=1"]


def test_a_missing_restoration_is_named(faces, tmp_path):
    out = tmp_path / "restored"
    _restore(faces, out, "-w", "0", "1")
    (out / "final_results" / "ben_w1.00.png").unlink()
    done = _command("codeformer-evaluate", "--restored", out, "--gt", faces["gt"], "--out", tmp_path / "eval",
                    "--metrics", "psnr")
    assert done.returncode == 2
    assert "not every ground-truth image was restored at every w; missing w=1: ben" in done.stderr
    done = _command("codeformer-evaluate", "--restored", out, "--gt", faces["lq"].parent / "nothing", "--out",
                    tmp_path / "eval", "--metrics", "psnr")
    assert done.returncode == 2 and "not a directory" in done.stderr

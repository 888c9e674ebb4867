"""``codeformer-evaluate`` end to end on tiny folders: tables, numbers, plot over w, missing weights."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import random_faces, write_folder
from PIL import Image

from codeformer_lightning import save_weights
from codeformer_lightning.evaluation import PSNR_CAP, psnr, ssim
from codeformer_lightning.evaluation.cli import main
from codeformer_lightning.evaluation.report import plot_over_w
from codeformer_lightning.nn import CodeFormer

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS. no linear heads")


@pytest.fixture
def folders(tmp_path):
    """gt: 3 faces; restored: a identical, b offset by +10/255, c offset by -20/255."""
    gts = random_faces(3, 32, seed=1)
    write_folder(tmp_path / "gt", dict(zip("abc", gts)))
    write_folder(tmp_path / "restored", {"a": gts[0], "b": gts[1] + 10, "c": gts[2] - 20})
    return tmp_path


def _json(out):
    return json.loads((out / "metrics.json").read_text())


def test_folder_mode_writes_markdown_csv_and_json_with_the_right_numbers(
    folders, vgg_file, arcface_file, capsys
):
    out = folders / "eval"
    rc = main(
        [
            "--restored",
            str(folders / "restored"),
            "--gt",
            str(folders / "gt"),
            "--out",
            str(out),
            "--metrics",
            "psnr",
            "ssim",
            "lpips",
            "identity",
            "--vgg-weights",
            str(vgg_file),
            "--arcface-weights",
            str(arcface_file),
            "--not-aligned",
        ]
    )
    assert rc == 0
    run = _json(out)["runs"][0]
    per = run["per_image"]
    assert per["a"]["psnr"] == PSNR_CAP and per["a"]["ssim"] == pytest.approx(1.0)
    assert per["b"]["psnr"] == pytest.approx(20 * math.log10(25.5), abs=1e-4)
    assert per["c"]["psnr"] == pytest.approx(20 * math.log10(255 / 20), abs=1e-4)
    assert per["a"]["lpips"] == 0.0 and per["b"]["lpips"] > 0
    assert per["a"]["identity"] == pytest.approx(1.0, abs=1e-5)
    for metric in ("psnr", "ssim", "lpips", "identity"):
        assert run["mean"][metric] == pytest.approx(np.mean([per[k][metric] for k in "abc"]))
    assert run["unavailable"] == {} and run["failed"] == {}

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a", "b", "c", "mean"]
    assert float(rows[1]["psnr"]) == pytest.approx(per["b"]["psnr"])
    assert float(rows[3]["lpips"]) == pytest.approx(run["mean"]["lpips"])

    md = (out / "metrics.md").read_text()
    assert "| restored | 3 | " + f"{run['mean']['psnr']:.2f} | {run['mean']['ssim']:.4f}" in md
    assert f"| b | {per['b']['psnr']:.2f} |" in md
    assert not (out / "fidelity_quality.png").exists()  # a single run: no curve
    assert "PSNR" in capsys.readouterr().out


def test_missing_weights_are_reported_per_metric_and_the_rest_still_runs(folders):
    out = folders / "eval"
    with pytest.warns(UserWarning, match="unavailable"):
        rc = main(
            [
                "--restored",
                str(folders / "restored"),
                "--gt",
                str(folders / "gt"),
                "--out",
                str(out),
                "--metrics",
                "psnr",
                "lpips",
                "fid",
                "identity",
            ]
        )
    assert rc == 0
    run = _json(out)["runs"][0]
    assert set(run["unavailable"]) == {"lpips", "fid", "identity"}
    assert (
        "vgg16-397923af.pth" in run["unavailable"]["lpips"] and "--vgg-weights" in run["unavailable"]["lpips"]
    )
    assert "--fid-weights" in run["unavailable"]["fid"]
    assert "--arcface-weights" in run["unavailable"]["identity"]
    assert list(run["mean"]) == ["psnr"] and run["mean"]["psnr"] > 20  # never a silent zero for the others
    md = (out / "metrics.md").read_text()
    assert "## Unavailable metrics" in md and "**identity**" in md
    with (out / "metrics.csv").open() as f:
        assert next(csv.DictReader(f)).keys() == {"run", "w", "image", "psnr"}


def test_unmatched_folders_exit_with_the_names(folders, capsys):
    write_folder(folders / "gt", {"extra": random_faces(1)[0]})
    rc = main(
        ["--restored", str(folders / "restored"), "--gt", str(folders / "gt"), "--out", str(folders / "o")]
    )
    assert rc == 2 and "only in ground truth (1): extra" in capsys.readouterr().err


def test_bad_argument_combinations_are_refused(folders):
    with pytest.raises(SystemExit):
        main(["--gt", str(folders / "gt"), "--out", str(folders / "o")])
    with pytest.raises(SystemExit):
        main(["--weights", "x.safetensors", "--gt", str(folders / "gt"), "--out", str(folders / "o")])
    with pytest.raises(SystemExit):
        main(["--restored", str(folders), "--gt", str(folders), "-w", "0", "1", "--out", str(folders / "o")])


def test_model_mode_restores_at_each_w_and_plots_the_trade_off(tmp_path, tiny_cf_config):
    model = CodeFormer(**tiny_cf_config).eval()
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    gts = random_faces(3, 32, seed=5)
    lqs = [
        np.asarray(Image.fromarray(g).resize((8, 8), Image.BILINEAR).resize((32, 32), Image.BILINEAR))
        for g in gts
    ]
    write_folder(tmp_path / "gt", dict(zip("abc", gts)))
    write_folder(tmp_path / "lq", dict(zip("abc", lqs)))
    out = tmp_path / "eval"
    rc = main(
        [
            "--weights",
            str(weights),
            "--lq",
            str(tmp_path / "lq"),
            "--gt",
            str(tmp_path / "gt"),
            "-w",
            "0",
            "0.5",
            "1",
            "--metrics",
            "psnr",
            "ssim",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--save-restored",
        ]
    )
    assert rc == 0
    runs = _json(out)["runs"]
    assert [r["w"] for r in runs] == [0.0, 0.5, 1.0] and [r["label"] for r in runs] == ["w=0", "w=0.5", "w=1"]
    # the numbers are those of the network's own output at that w
    lq = torch.from_numpy(np.stack(lqs)).permute(0, 3, 1, 2).float() / 255
    gt = torch.from_numpy(np.stack(gts)).permute(0, 3, 1, 2).float() / 255
    for run in runs:
        with torch.inference_mode():
            restored = ((model(lq * 2 - 1, w=run["w"]) + 1) / 2).clamp(0, 1)
        restored = (restored * 255).round() / 255  # the evaluation sees 8-bit output, as saved
        expected = psnr(restored, gt)
        assert [run["per_image"][k]["psnr"] for k in "abc"] == pytest.approx(expected.tolist(), abs=1e-3)
        assert run["mean"]["ssim"] == pytest.approx(ssim(restored, gt).mean().item(), abs=1e-3)
        assert (out / "restored" / f"w_{run['w']:g}" / "a.png").is_file()
    assert runs[0]["mean"]["psnr"] != runs[2]["mean"]["psnr"]  # w changes the output
    with Image.open(out / "fidelity_quality.png") as plot:
        assert plot.size[0] > 200 and plot.size[1] > 100
    assert "| w=0.5 | 3 |" in (out / "metrics.md").read_text()


def test_model_mode_with_a_wrong_weight_file_exits_with_the_file_name(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    write_folder(tmp_path / "gt", {"a": random_faces(1)[0]})
    rc = main(
        [
            "--weights",
            str(bad),
            "--lq",
            str(tmp_path / "gt"),
            "--gt",
            str(tmp_path / "gt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "bad.pth" in capsys.readouterr().err


def test_plot_falls_back_to_pil(tmp_path):
    from codeformer_lightning.evaluation import EvaluationResult

    runs = [
        EvaluationResult(
            label=f"w={w}", metrics=["psnr", "lpips"], w=w, mean={"psnr": 20 + w, "lpips": 0.3 - 0.1 * w}
        )
        for w in (0.0, 0.5, 1.0)
    ]
    path, backend = plot_over_w(runs, tmp_path / "p.png", backend="pil")
    with Image.open(path) as plot:
        assert backend == "pil" and plot.size == (640, 240)
    with pytest.raises(ValueError, match="at least two"):
        plot_over_w(runs[:1], tmp_path / "q.png")

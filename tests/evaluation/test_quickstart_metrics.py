"""The quickstart's metrics table gives the numbers ``codeformer-evaluate`` gives for the same images."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch

from codeformer_lightning import quickstart, save_weights
from codeformer_lightning.data import FaceDataModule
from codeformer_lightning.evaluation.cli import main as evaluate_main
from codeformer_lightning.io import write_image
from codeformer_lightning.nn import CodeFormer

TINY_CF = dict(
    img_size=32,
    nf=16,
    ch_mult=(1, 2, 2, 4),
    res_blocks=1,
    attn_resolutions=(4,),
    codebook_size=64,
    emb_dim=32,
    norm_groups=8,
    dim_embd=64,
    n_head=4,
    n_layers=2,
    fusion_resolutions=(8, 16),
)


def _uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8, as a PNG would hold it."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def test_quickstart_metrics_equal_codeformer_evaluate_on_the_same_images(tmp_path):
    faces = quickstart.build_face_folder(tmp_path / "faces", size=32) / "val"
    torch.manual_seed(0)
    model = CodeFormer(**TINY_CF).eval()
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    data = FaceDataModule(
        train_dir=faces,
        val_dir=faces,
        image_size=32,
        degradation="stage3_small",
        val_split=0,
        batch_size=8,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )
    metrics = quickstart.evaluate(weights, tmp_path / "qs", data, fidelities=(0.0, 1.0), max_images=2)

    # the same held-out pairs written as PNGs, then measured by the evaluation command
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        runs = {"input": batch["lq"], **{f"w{w:g}": model(batch["lq"], w=w, adain=True) for w in (0.0, 1.0)}}
    for i, face in enumerate(_uint8(batch["gt"])):
        write_image(tmp_path / "gt" / f"{i}.png", face)
    rows = {row["restoration"]: row for row in csv.DictReader(open(tmp_path / "qs" / "metrics.csv"))}
    for name, images in runs.items():
        for i, face in enumerate(_uint8(images)):
            write_image(tmp_path / name / f"{i}.png", face)
        out = tmp_path / f"report_{name}"
        assert (
            evaluate_main(
                [
                    "--restored",
                    str(tmp_path / name),
                    "--gt",
                    str(tmp_path / "gt"),
                    "--metrics",
                    "psnr",
                    "ssim",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        mean = json.loads((out / "metrics.json").read_text())["runs"][0]["mean"]
        assert abs(metrics[f"eval/psnr_{name}"] - mean["psnr"]) < 1e-4, name
        assert abs(metrics[f"eval/ssim_{name}"] - mean["ssim"]) < 1e-5, name
        assert abs(float(rows[name]["psnr_db"]) - mean["psnr"]) < 1e-3  # the table holds them (3 decimals)
    assert len(batch["gt"]) == 8  # every held-out face entered the means


def test_the_grid_is_titled_and_enlarged_and_metrics_md_reports_stage_one(tmp_path):
    """grid.png: one row per face, columns input | w=0 | w=1 | ground truth under a title band, each
    face the saved 8-bit face enlarged by whole pixels to >= 96 px; metrics.md has the table, the
    stage I reconstruction of the clean faces and what the columns are."""
    from codeformer_lightning.io import read_image
    from codeformer_lightning.nn import VQAutoEncoder

    faces = quickstart.build_face_folder(tmp_path / "faces", size=32) / "val"
    torch.manual_seed(0)
    model = CodeFormer(**TINY_CF).eval()
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    transformer = ("dim_embd", "n_head", "n_layers", "fusion_resolutions")
    autoencoder_args = {k: v for k, v in TINY_CF.items() if k not in transformer}
    stage1 = save_weights(VQAutoEncoder(**autoencoder_args).eval(), tmp_path / "stage1.safetensors")
    data = FaceDataModule(
        train_dir=faces, val_dir=faces, image_size=32, degradation="stage2", val_split=0, batch_size=8,
        num_workers=0, pin_memory=False, persistent_workers=False,
    )  # fmt: skip
    metrics = quickstart.evaluate(
        weights, tmp_path / "qs", data, fidelities=(0.0, 1.0), max_images=3, face_px=96, autoencoder=stage1
    )
    assert "eval/psnr_stage1_recon" in metrics and "eval/ssim_stage1_recon" in metrics

    grid = read_image(tmp_path / "qs" / "grid.png")
    tile, gap, columns, rows = 96, 4, 4, 3  # 32 px x 3
    band = grid.shape[0] - rows * (tile + gap)
    assert band > 10 and grid.shape[1] == columns * (tile + gap) - gap
    titles = grid[:band]
    for c in range(columns):  # every column has its (dark) title text
        assert (titles[:, c * (tile + gap) : c * (tile + gap) + tile] < 128).any(), c
    batch = next(iter(data.val_dataloader()))
    gt_faces = _uint8(batch["gt"])
    for r in range(rows):  # the ground-truth column is the 8-bit face, each pixel a 3x3 block
        top, left = band + r * (tile + gap), (columns - 1) * (tile + gap)
        shown = grid[top : top + tile, left : left + tile]
        np.testing.assert_array_equal(shown, gt_faces[r].repeat(3, 0).repeat(3, 1))

    md = (tmp_path / "qs" / "metrics.md").read_text()
    for row in ("| input |", "| w=0 |", "| w=1 |"):
        assert row in md
    assert "Stage I" in md and "input | w=0 | w=1 | ground truth" in md

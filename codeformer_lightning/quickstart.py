"""The quickstart: real faces that ship with scikit-image, tiny stages, and an evaluation grid.

``codeformer-train experiment=quickstart`` trains stage I -> II -> III at 32 px on CPU in minutes,
with no download and no data of the user's: :func:`build_face_folder` writes an aligned-face folder
from scikit-image's bundled images (the 100 face crops of its LFW subset and the astronaut's face),
and :func:`evaluate` restores held-out degraded faces at several fidelity values ``w`` and writes
``grid.png`` and ``metrics.csv`` / ``metrics.md`` (PSNR / SSIM per ``w``: per-image means computed by
:mod:`codeformer_lightning.evaluation`, the numbers ``codeformer-evaluate`` gives for the same images).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

#: The first 100 images of ``skimage.data.lfw_subset()`` are faces (the other 100 are not).
LFW_FACES = 100
#: Face box of ``skimage.data.astronaut()`` (rows, cols), framed like the LFW crops.
ASTRONAUT_FACE = (slice(42, 182), slice(152, 292))
_DONE = ".complete"
#: Bump when the faces a given size, num_val and seed produce change (crops, resampling): cached
#: folders of an older version are then not reused.
FACES_VERSION = 1


def _face_crops(seed: int) -> list[tuple[str, np.ndarray]]:
    """``(name, (H, W, 3) uint8 RGB)`` face crops from scikit-image's bundled data (no download)."""
    from skimage import data

    faces = [
        (f"lfw_{i:03d}", np.repeat((face * 255).round().astype(np.uint8)[..., None], 3, axis=2))
        for i, face in enumerate(data.lfw_subset()[:LFW_FACES])
    ]
    # The one colour face: a few jittered crops, so colour is not a single training sample.
    astronaut = data.astronaut()
    rows, cols = ASTRONAUT_FACE
    rng = np.random.default_rng(seed)
    for k in range(8):
        dy, dx = rng.integers(-8, 9, size=2)
        faces.append(
            (f"astronaut_{k}", astronaut[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx])
        )
    return faces


def build_face_folder(root: str | os.PathLike, size: int = 32, num_val: int = 8, seed: int = 0) -> Path:
    """Write ``root/train/*.png`` and ``root/val/*.png``: aligned RGB faces of ``size`` px.

    Idempotent and safe when several processes call it at once (the folder is built aside and
    moved into place; a finished folder of the same faces is reused, one of other faces is an
    error). ``num_val`` faces are held out (fixed by ``seed``), always including one colour face.
    Returns ``root``. :func:`cached_face_folder` keeps one such folder per size, held-out count and seed.
    """
    root = Path(root)
    if (root / _DONE).is_file():
        _check_cached(root, _marker(size, num_val, seed))
        return root
    faces = _face_crops(seed)
    rng = np.random.default_rng(seed)
    gray = [i for i, (name, _) in enumerate(faces) if name.startswith("lfw")]
    colour = [i for i, (name, _) in enumerate(faces) if not name.startswith("lfw")]
    val = set(rng.choice(gray, size=num_val - 1, replace=False).tolist()) | {colour[0]}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    for i, (name, image) in enumerate(faces):
        split = "val" if i in val else "train"
        (tmp / split).mkdir(exist_ok=True)
        Image.fromarray(image).resize((size, size), Image.BICUBIC).save(tmp / split / f"{name}.png")
    (tmp / _DONE).write_text(_marker(size, num_val, seed))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first (or root existed unfinished): keep one copy
        if not (root / _DONE).is_file():
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _marker(size: int, num_val: int, seed: int) -> str:
    """What a finished face folder holds (the content of its ``.complete`` file)."""
    return f"size={size} num_val={num_val} seed={seed} version={FACES_VERSION}\n"


def _check_cached(root: Path, wanted: str) -> None:
    found = (root / _DONE).read_text()
    if found != wanted:
        raise ValueError(
            f"{root} holds other quickstart faces ({found.strip()}) than asked for ({wanted.strip()}): remove the "
            "folder or build into another one (codeformer_lightning.quickstart.face_folder keeps one folder per "
            "size, held-out count and seed)"
        )


def cached_face_folder(root: str | os.PathLike, size: int = 32, num_val: int = 8, seed: int = 0) -> Path:
    """``root/<size>px_<num_val>val_seed<seed>_v<FACES_VERSION>``: the quickstart faces of these
    settings, each in its own folder, so a run at another size never reuses (and resizes) the faces
    of an earlier run. Built when absent (see :func:`build_face_folder`)."""
    key = f"{size}px_{num_val}val_seed{seed}_v{FACES_VERSION}"
    return build_face_folder(Path(root) / key, size=size, num_val=num_val, seed=seed)


def face_folder(
    root: str | os.PathLike, split: str = "train", size: int = 32, num_val: int = 8, seed: int = 0
) -> str:
    """The ``split`` folder of :func:`cached_face_folder` (built first when needed).

    Meant as a nested ``_target_`` in data configs, so the folder exists before the data module
    is built: ``train_dir: {_target_: codeformer_lightning.quickstart.face_folder, root: ..., split: train}``.
    """
    if split not in {"train", "val"}:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return str(cached_face_folder(root, size=size, num_val=num_val, seed=seed) / split)


def _as_8bit(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> [0, 1] rounded to 8-bit levels (the PNG a user would save)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 255.0


#: grid column titles of the evaluation's image sets
_TITLES = {"input": "input", "gt": "ground truth"}


def _title(name: str) -> str:
    """``w0.5`` -> ``w=0.5``; ``input``, ``gt`` -> their titles."""
    return _TITLES.get(name, name.replace("w", "w=", 1))


def labelled_grid(columns: dict[str, torch.Tensor], max_rows: int = 8, face_px: int = 96) -> np.ndarray:
    """One row per face, one titled column per entry of ``columns`` (``name -> (B, 3, S, S)`` in
    [-1, 1]); faces enlarged by nearest neighbour (whole pixels) to at least ``face_px`` px.

    Returns ``(H, W, 3) uint8``: a title band on top, white gaps between faces.
    """
    from PIL import ImageDraw, ImageFont

    rows = min(max_rows, *(images.shape[0] for images in columns.values()))
    size = next(iter(columns.values())).shape[-1]
    zoom = -(-face_px // size)  # ceil: whole pixels, never below face_px
    tile, gap, band = size * zoom, 4, 22
    canvas = np.full((band + rows * (tile + gap), len(columns) * (tile + gap) - gap, 3), 255, np.uint8)
    for c, images in enumerate(columns.values()):
        faces = (_as_8bit(images[:rows].float()) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for r, face in enumerate(faces):
            top, left = band + r * (tile + gap), c * (tile + gap)
            canvas[top : top + tile, left : left + tile] = face.repeat(zoom, 0).repeat(zoom, 1)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for c, name in enumerate(columns):
        text = _title(name)
        width = draw.textlength(text, font=font)
        draw.text((c * (tile + gap) + (tile - width) / 2, 3), text, fill="black", font=font)
    return np.asarray(image)


def _restore_held_out(model, data, fidelities: Sequence[float], adain: bool) -> dict[str, torch.Tensor]:
    """``{"input", "w0", ..., "gt"} -> (N, 3, S, S)`` in [-1, 1] over ``data``'s validation faces."""
    columns: dict[str, list[torch.Tensor]] = {"input": [], **{f"w{w:g}": [] for w in fidelities}, "gt": []}
    data.setup("validate")
    for batch in data.val_dataloader():
        lq, gt = batch["lq"].float(), batch["gt"].float()
        columns["input"].append(lq)
        for w in fidelities:
            columns[f"w{w:g}"].append(model(lq, w=float(w), adain=adain).float())
        columns["gt"].append(gt)
    return {name: torch.cat(parts).clamp(-1, 1) for name, parts in columns.items()}


def _stage1_reconstruction(autoencoder: str | os.PathLike | None, gt: torch.Tensor) -> torch.Tensor | None:
    """Stage I's reconstruction ``(N, 3, S, S)`` of the clean faces ``gt``; None without its file."""
    from .checkpoints import load_pretrained
    from .nn import VQAutoEncoder

    if autoencoder is None:
        return None
    if not Path(autoencoder).is_file():
        log.warning(
            "Quickstart evaluation: no stage I weights at %s; its reconstruction is not measured", autoencoder
        )
        return None
    net = load_pretrained(autoencoder)
    if not isinstance(net, VQAutoEncoder):
        raise TypeError(
            f"{autoencoder}: holds a {type(net).__name__}; stage I weights (a VQAutoEncoder) expected"
        )
    return net(gt)[0].float().clamp(-1, 1)


def _write_tables(out: Path, rows: list[tuple[str, float, float]], notes: list[str]) -> None:
    """``metrics.csv`` (restorations only) and ``metrics.md`` (with ``notes``) in ``out``."""
    restorations = [row for row in rows if row[0] != STAGE1]
    with open(out / "metrics.csv", "w") as f:
        f.write("restoration,psnr_db,ssim\n")
        f.writelines(f"{name},{psnr:.3f},{ssim:.4f}\n" for name, psnr, ssim in restorations)
    with open(out / "metrics.md", "w") as f:
        f.write("# Quickstart: held-out faces\n\n")
        f.write("| restoration | PSNR (dB) | SSIM |\n|---|---|---|\n")
        f.writelines(f"| {_title(name)} | {psnr:.2f} | {ssim:.3f} |\n" for name, psnr, ssim in restorations)
        f.write("\n" + "\n\n".join(notes) + "\n")


#: the metrics row of stage I's reconstruction of the clean held-out faces
STAGE1 = "stage1_recon"


@torch.no_grad()
def evaluate(
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    data,
    fidelities: Sequence[float] = (0.0, 0.5, 1.0),
    adain: bool = True,
    max_images: int = 8,
    face_px: int = 96,
    autoencoder: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Restore held-out degraded faces at each ``w``; write ``grid.png``, ``metrics.csv``, ``metrics.md``.

    Args:
        weights: CodeFormer weights (a stage II/III export or a published ``.pth``).
        out_dir: where the files go.
        data: a LightningDataModule whose ``val_dataloader()`` yields ``{"lq", "gt"}`` batches
            ``(B,3,S,S)`` in [-1,1] (the held-out faces with synthetic degradations).
        fidelities: the ``w`` values to restore with.
        adain: AdaIN in the restoration (the published inference uses it).
        max_images: faces in the grid (all held-out faces enter the metrics).
        face_px: each face of the grid is enlarged (nearest neighbour) to at least this size.
        autoencoder: stage I weights: their reconstruction of the clean held-out faces is measured
            too (row ``stage1_recon``: the autoencoder's ceiling; skipped with a warning when the
            file is missing).

    ``grid.png``: rows are faces; columns input | w=... | ground truth, titled. Returns
    ``{"eval/psnr_input": ..., "eval/psnr_w0.5": ..., "eval/ssim_w0.5": ..., ...}``: means over the
    held-out faces of the per-image PSNR (dB) and SSIM of :mod:`codeformer_lightning.evaluation`, on
    the 8-bit images a user would save (``input`` is the degraded face itself).
    """
    from .checkpoints import load_pretrained
    from .evaluation.metrics import psnr, ssim
    from .io import write_image
    from .nn import CodeFormer

    log.info("Quickstart evaluation of %s on the held-out faces", weights)
    model = load_pretrained(weights)
    if not isinstance(model, CodeFormer):
        raise TypeError(
            f"{weights}: holds a {type(model).__name__}; evaluate needs CodeFormer weights (stage II/III)"
        )
    images = _restore_held_out(model, data, fidelities, adain)
    measured = {name: images[name] for name in ["input", *(f"w{w:g}" for w in fidelities)]}
    stage1 = _stage1_reconstruction(autoencoder, images["gt"])
    if stage1 is not None:
        measured = {STAGE1: stage1, **measured}
    gt01 = _as_8bit(images["gt"])
    metrics: dict[str, float] = {}
    rows = []
    for name, restored in measured.items():
        pred01 = _as_8bit(restored)
        mean_psnr, mean_ssim = float(psnr(pred01, gt01).mean()), float(ssim(pred01, gt01).mean())
        metrics[f"eval/psnr_{name}"], metrics[f"eval/ssim_{name}"] = mean_psnr, mean_ssim
        rows.append((name, mean_psnr, mean_ssim))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_image(out / "grid.png", labelled_grid(images, max_images, face_px))
    n, size = images["gt"].shape[0], images["gt"].shape[-1]
    degradation = getattr(data, "hparams", {}).get("degradation", "synthetic")
    notes = [
        f"{n} held-out faces (never trained on), {size} px, degraded with the `{degradation}` preset "
        f"(its ranges scaled from 512 px to {size} px faces); AdaIN {'on' if adain else 'off'}. PSNR and "
        "SSIM: means of the per-image values on the 8-bit images (what `codeformer-evaluate` reports).",
        f"`grid.png`: the first {min(n, max_images)} faces, one per row; columns "
        f"{' | '.join(map(_title, images))}, each face enlarged by nearest neighbour to "
        f"{-(-face_px // size) * size} px.",
    ]
    if stage1 is not None:
        s1 = rows[0]
        notes.append(
            f"Stage I (the autoencoder alone) reconstructs the clean held-out faces at {s1[1]:.2f} dB PSNR, "
            f"SSIM {s1[2]:.3f}: how much of a face the learnt codebook can express."
        )
    _write_tables(out, rows, notes)
    return metrics

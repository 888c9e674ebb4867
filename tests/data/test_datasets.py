"""FaceDataset: sample contents, seeding, flips with codes, bad files, sizes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image, write_folder
from PIL import Image
from torch.utils.data import DataLoader

from codeformer_lightning.data import BadImageWarning, FaceDataset, ImageFolderSource, LmdbSource, pack_lmdb
from codeformer_lightning.data.datasets import read_face
from codeformer_lightning.evaluation import load_image
from codeformer_lightning.io import decode_image, read_image


def _fake_codes(names, length=4):
    return {
        "orig": {n: torch.full((length,), i, dtype=torch.long) for i, n in enumerate(names)},
        "hflip": {n: torch.full((length,), 1000 + i, dtype=torch.long) for i, n in enumerate(names)},
    }


def test_sample_dict_shapes_and_ranges(face_folder):
    folder, names = face_folder
    ds = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=0)
    s = ds[0]
    assert s["gt"].shape == s["lq"].shape == (3, 32, 32)
    assert s["gt"].dtype == torch.float32 and -1 <= float(s["gt"].min()) and float(s["gt"].max()) <= 1
    assert s["name"] in names
    assert not torch.equal(s["gt"], s["lq"])


def test_identical_seeds_identical_pairs_other_indices_epochs_and_seeds_differ(face_folder):
    folder, _ = face_folder
    a = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=1)
    b = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=1)
    assert torch.equal(a[3]["lq"], b[3]["lq"])
    c = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=2)
    assert not torch.equal(a[3]["lq"], c[3]["lq"])
    first = a[3]["lq"]
    a.set_epoch(1)
    assert not torch.equal(a[3]["lq"], first)  # new degradations every epoch
    a.set_epoch(0)
    assert torch.equal(a[3]["lq"], first)


def test_workers_give_the_same_pairs_as_the_main_process_and_differ_between_indices(face_folder):
    folder, _ = face_folder
    ds = FaceDataset(ImageFolderSource(folder), 32, "stage3_small", seed=0)
    ds.set_epoch(2)  # reaches the workers through shared memory
    main = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
    workers = next(iter(DataLoader(ds, batch_size=2, num_workers=2)))
    torch.testing.assert_close(workers["lq"], main["lq"][:2], rtol=0, atol=0)
    flat = main["lq"].flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 8  # every index its own pair


def test_fixed_dataset_ignores_epoch_and_never_flips(face_folder):
    folder, _ = face_folder
    ds = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=0, fixed=True)
    before = [ds[i]["lq"] for i in range(4)]
    ds.set_epoch(5)
    for i in range(4):
        assert torch.equal(ds[i]["lq"], before[i])
        clean = np.asarray(Image.open(folder / f"{ds[i]['name']}.png"))
        np.testing.assert_allclose(ds[i]["gt"].permute(1, 2, 0).numpy(), clean / 127.5 - 1, atol=1e-6)


def test_flip_flips_gt_and_lq_together_and_picks_hflip_codes(face_folder):
    folder, names = face_folder
    codes = _fake_codes(names)
    plain = FaceDataset(ImageFolderSource(folder), 32, "none", seed=0, use_hflip=False, latent_codes=codes)
    flipping = FaceDataset(ImageFolderSource(folder), 32, "none", seed=0, latent_codes=codes)
    flipped = 0
    for i in range(len(names)):
        p, f = plain[i], flipping[i]
        k = names.index(p["name"])
        assert torch.equal(f["gt"], f["lq"])  # degradation none: lq = gt, flipped together
        if torch.equal(f["gt"], p["gt"].flip(-1)) and not torch.equal(f["gt"], p["gt"]):
            flipped += 1
            assert f["codes"].tolist() == [1000 + k] * 4
        else:
            assert torch.equal(f["gt"], p["gt"])
            assert f["codes"].tolist() == [k] * 4
    assert 0 < flipped < len(names)


def test_missing_codes_name_the_face(face_folder):
    folder, names = face_folder
    codes = _fake_codes(names[1:])
    with pytest.raises(KeyError, match=names[0]):
        FaceDataset(ImageFolderSource(folder), 32, "stage2", latent_codes=codes)


def test_stage3_pairs_and_task_variants(face_folder):
    folder, _ = face_folder
    pair = FaceDataset(ImageFolderSource(folder), 32, "stage3_small", paired_small_large=True)[0]
    assert pair["lq_large"].shape == pair["lq"].shape and not torch.equal(pair["lq"], pair["lq_large"])
    colour = FaceDataset(ImageFolderSource(folder), 32, "none", task="grayscale", seed=3)
    gray_like = [colour[i]["lq"] for i in range(8)]
    # grayscale (then at most a per-channel cast): channel differences are constant over the image
    for lq in gray_like:
        d = lq[0] - lq[1]
        assert float(((d - d.median()).abs() < 1e-5).float().mean()) > 0.9  # all but saturated pixels
    inpaint = FaceDataset(ImageFolderSource(folder), 32, "none", task="inpainting")[1]
    assert inpaint["mask"].shape == (1, 32, 32) and inpaint["mask"].sum() > 0
    keep = inpaint["mask"][0] == 0
    assert torch.equal(inpaint["lq"][:, keep], inpaint["gt"][:, keep])
    with pytest.raises(ValueError, match="valid tasks: restoration, inpainting, grayscale"):
        FaceDataset(ImageFolderSource(folder), 32, task="deblur")


def _write_bad_folder(root: Path) -> tuple[list[str], list[str]]:
    """Good images (some needing conversion) and broken files; returns (good names, bad names)."""
    good = write_folder(root, 4, 32)
    img = smooth_image(32, 11)
    rgba = np.dstack([img, np.full((32, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(img[:, :, 0].astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(img[:, :, 1], "L").save(root / "gray8.png")
    Image.fromarray(img).convert("P", palette=Image.ADAPTIVE, colors=16).save(root / "palette.png")
    Image.fromarray(img).save(root / "photo.jpg", quality=90)
    Image.fromarray(smooth_image(8, 2)).save(root / "tiny.png")
    good += ["rgba", "gray16", "gray8", "palette", "photo", "tiny"]
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    full = (root / "face_000.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "notes.png").write_text("this is a text file, not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("ignored: not an image suffix")
    return good, ["corrupt", "truncated", "notes", "empty"]


def test_bad_files_are_skipped_with_named_warnings_and_good_samples_all_delivered(tmp_path):
    good, bad = _write_bad_folder(tmp_path / "mixed")
    ds = FaceDataset(ImageFolderSource(tmp_path / "mixed"), 32, "stage2", seed=0, use_hflip=False)
    assert len(ds) == len(good) + len(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    for name in bad:
        hits = [m for m in messages if f"{name}." in m and "skipped" in m]
        assert len(hits) == 1, (name, messages)  # one warning per bad file
    assert any("tiny.png" in m and "8x8" in m and "resized" in m for m in messages)
    assert any("notes.png" in m and "not an image" in m for m in messages)
    delivered = {s["name"] for s in samples}
    assert delivered == set(good)  # every good face, no bad one
    assert sorted(Path(p).stem for p in ds.skipped_names()) == sorted(bad)
    for s in samples:
        assert s["gt"].shape == (3, 32, 32) and torch.isfinite(s["lq"]).all()
    # replacements are deterministic
    again = FaceDataset(ImageFolderSource(tmp_path / "mixed"), 32, "stage2", seed=0, use_hflip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [again[i]["name"] for i in range(len(again))] == [s["name"] for s in samples]


def test_conversions_to_rgb8(tmp_path):
    img = smooth_image(16, 1)
    rgba = np.dstack([img, np.zeros((16, 16), np.uint8)])
    rgba[:8, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image((tmp_path / "a.png").read_bytes(), "a.png")
    np.testing.assert_array_equal(out[:8], img[:8])
    assert (out[8:] == 255).all()  # transparent -> white
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "w16.png")
    assert (decode_image((tmp_path / "w16.png").read_bytes()) == 255).all()
    Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)).save(tmp_path / "g16.png")
    assert (decode_image((tmp_path / "g16.png").read_bytes()) == 100).all()


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] (dataset) or [0, 1] (evaluation, pass ``image * 2 - 1``) -> uint8 HWC."""
    return ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def test_training_latent_codes_inference_and_evaluation_see_the_same_pixels(tmp_path):
    """A 16-bit colour PNG and an EXIF-rotated JPEG: one set of pixels through every path."""
    import cv2
    from PIL import ImageOps

    folder = tmp_path / "faces"
    folder.mkdir()
    rgb16 = np.random.default_rng(0).integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "wide.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated 90 degrees counter-clockwise
    Image.fromarray(smooth_image(32, 5)).save(folder / "turned.jpg", exif=exif, quality=90)
    expected = {
        # independent computations: nearest 8-bit level; PIL's own decode and exif_transpose
        "wide": np.floor(rgb16 * (255.0 / 65535.0) + 0.5).astype(np.uint8),
        "turned": np.asarray(ImageOps.exif_transpose(Image.open(folder / "turned.jpg")).convert("RGB")),
    }
    assert not np.array_equal(expected["turned"], np.asarray(Image.open(folder / "turned.jpg").convert("RGB")))
    pack_lmdb(folder, tmp_path / "faces.lmdb")
    for source in (ImageFolderSource(folder), LmdbSource(tmp_path / "faces.lmdb")):
        data = FaceDataset(source, 32, "none", use_hflip=False)
        for i in range(len(data)):
            sample = data[i]
            np.testing.assert_array_equal(_as_uint8(sample["gt"]), expected[sample["name"]])
            np.testing.assert_array_equal(_as_uint8(sample["lq"]), expected[sample["name"]])
    for path in (folder / "wide.png", folder / "turned.jpg"):
        want = expected[path.stem]
        np.testing.assert_array_equal(read_image(path), want)  # inference (codeformer-restore, FaceRestorer)
        np.testing.assert_array_equal(_as_uint8(load_image(path)[0] * 2 - 1), want)  # evaluation
        np.testing.assert_array_equal(read_face(path, 32), want)  # latent codes


def test_wrong_size_resize_warns_once_or_rejects(tmp_path):
    write_folder(tmp_path / "f", 3, 48)
    ds = FaceDataset(ImageFolderSource(tmp_path / "f"), 32, "none", use_hflip=False)
    with pytest.warns(BadImageWarning, match=r"face_000\.png: image is 48x48 px, resized to 32x32"):
        assert ds[0]["gt"].shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # once per file
    write_folder(tmp_path / "f", 1, 32, prefix="right")
    strict = FaceDataset(
        ImageFolderSource(tmp_path / "f"), 32, "none", on_wrong_size="error", use_hflip=False
    )
    with pytest.warns(BadImageWarning, match=r"48x48 px, expected 32x32"):
        names = {strict[i]["name"] for i in range(len(strict))}
    assert names == {"right_000"}


def test_folder_errors_and_file_list(tmp_path, face_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolderSource(tmp_path / "empty")
    folder, names = face_folder
    (tmp_path / "list.txt").write_text(f"# subset\n{names[2]}.png\n{names[0]}.png\n")
    src = ImageFolderSource(folder, tmp_path / "list.txt")
    assert src.names == [names[2], names[0]]
    (tmp_path / "bad_list.txt").write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ImageFolderSource(folder, tmp_path / "bad_list.txt")


def test_workers_report_skipped_files_to_the_main_process(tmp_path):
    good, bad = _write_bad_folder(tmp_path / "mixed")
    ds = FaceDataset(ImageFolderSource(tmp_path / "mixed"), 32, "none", use_hflip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [n for batch in DataLoader(ds, batch_size=4, num_workers=2) for n in batch["name"]]
    assert set(names) == set(good) and len(names) == len(ds)
    assert sorted(Path(p).stem for p in ds.skipped_names()) == sorted(bad)  # flags set in the workers

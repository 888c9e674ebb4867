"""LMDB packing and reading: same pixels as the folder, lazy per-process handles."""

from __future__ import annotations

import json
import pickle

import lmdb
import pytest
import torch

from codeformer_lightning.data import FaceDataset, ImageFolderSource, LmdbSource
from codeformer_lightning.data.lmdb import main


def test_pack_and_read_round_trip_gives_folder_pixels(face_folder, tmp_path, capsys):
    folder, names = face_folder
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "faces.lmdb"
    assert main([str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed and f"packed {len(names)} images (8 x 32x32)" in printed
    source = LmdbSource(out)
    assert source.names == names and source.meta["count"] == len(names)
    (folder / "broken.png").unlink()
    for degradation in ("none", "stage2"):
        from_lmdb = FaceDataset(source, 32, degradation, seed=4)
        from_folder = FaceDataset(ImageFolderSource(folder), 32, degradation, seed=4)
        for i in range(len(names)):
            a, b = from_lmdb[i], from_folder[i]
            assert a["name"] == b["name"]
            assert torch.equal(a["gt"], b["gt"]) and torch.equal(a["lq"], b["lq"])
    assert source.read_bytes(0) == (folder / f"{names[0]}.png").read_bytes()  # original bytes
    assert source.meta["sizes"] == {"32x32": 8} and json.loads(json.dumps(source.meta))["format_version"] == 1


def test_source_pickles_without_handle_and_reopens(face_folder, tmp_path):
    folder, names = face_folder
    main([str(folder), str(tmp_path / "x.lmdb")])
    src = LmdbSource(tmp_path / "x.lmdb")
    first = src.read_bytes(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._env is None and clone.read_bytes(0) == first


def test_errors(tmp_path, face_folder, capsys):
    with pytest.raises(FileNotFoundError, match="codeformer-pack-lmdb"):
        LmdbSource(tmp_path / "missing.lmdb")
    folder, _ = face_folder
    main([str(folder), str(tmp_path / "y.lmdb")])
    assert main([str(folder), str(tmp_path / "y.lmdb")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), str(tmp_path / "z.lmdb")]) == 2
    with lmdb.open(str(tmp_path / "plain.lmdb")) as env, env.begin(write=True) as txn:
        txn.put(b"a", b"b")
    with pytest.raises(ValueError, match="not a face LMDB"):
        LmdbSource(tmp_path / "plain.lmdb")


def test_forked_loader_workers_read_an_lmdb_the_parent_opened(face_folder, tmp_path):
    # py-lmdb refuses a second open of a path in one process; forked workers inherit the parent's
    # handle (opened to read the keys), so each worker must drop it before opening its own
    folder, names = face_folder
    main([str(folder), str(tmp_path / "w.lmdb")])
    source = LmdbSource(tmp_path / "w.lmdb")
    expected = [source.read_bytes(i) for i in range(len(names))]
    ctx = torch.multiprocessing.get_context("fork")
    loader = torch.utils.data.DataLoader(
        _BytesOf(source), batch_size=None, num_workers=2, multiprocessing_context=ctx
    )
    assert list(loader) == expected
    assert source.read_bytes(0) == expected[0]  # the parent still reads


class _BytesOf(torch.utils.data.Dataset):
    def __init__(self, source: LmdbSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        return self.source.read_bytes(index)

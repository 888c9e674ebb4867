"""litdata shards (issue 17): packing, the folder dataset's pairs from the shards, the split of each
epoch over ranks and workers, bad records, and mid-epoch resumption inside real Trainer runs."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("litdata", reason="the [streaming] extra (litdata) is not installed")

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from conftest import write_folder  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

from codeformer_lightning.data import BadImageWarning, FaceDataset, ImageFolderSource, pack_lmdb  # noqa: E402
from codeformer_lightning.data.latent_codes import save_latent_codes  # noqa: E402
from codeformer_lightning.data.pack_streaming import main as pack_main  # noqa: E402
from codeformer_lightning.data.pack_streaming import pack_streaming  # noqa: E402
from codeformer_lightning.data.streaming import (  # noqa: E402
    MANIFEST_NAME,
    ShardSource,
    StreamingFaceDataModule,
    StreamingFaceDataset,
    StreamingFaceLoader,
)

#: tiny chunks, so that a few dozen 32 px faces span several of them
CHUNK_MB = 0.012


def pack(folder, out, **kwargs) -> dict:
    kwargs.setdefault("chunk_mb", CHUNK_MB)
    kwargs.setdefault("workers", 1)
    return pack_streaming(folder, out, progress=False, **kwargs)


def stream(shards, degradation="stage2", seed=0, batch_size=4, workers=0, codes=None, **loader_kw):
    """A loader over the shards, as the data module builds it (without a trainer)."""
    source = ShardSource(shards)
    faces = FaceDataset(source, 32, degradation, seed=seed, latent_codes=codes)
    return StreamingFaceLoader(
        StreamingFaceDataset(faces, seed=seed), batch_size, num_workers=workers, **loader_kw
    )


def epoch_indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, Path]:
    """The quickstart's 100 training faces (32 px, scikit-image) and their shards."""
    from codeformer_lightning.quickstart import build_face_folder

    root = tmp_path_factory.mktemp("quickstart")
    folder = build_face_folder(root / "faces", size=32) / "train"
    pack(folder, root / "shards", chunk_mb=0.02, workers=2)
    return folder, root / "shards"


# ----------------------------------------------------------------------------- packing
def test_pack_the_quickstart_faces_keeps_their_bytes_names_and_order(quickstart):
    folder, shards = quickstart
    files = sorted(folder.glob("*.png"))
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    index = json.loads((shards / "index.json").read_text())
    assert manifest["names"] == [f.stem for f in files] and manifest["count"] == 100
    assert manifest["sizes"] == {"32x32": 100} and manifest["skipped"] == [] and manifest["codes"] is None
    assert len(index["chunks"]) == manifest["chunks"] > 5
    assert [c["filename"] for c in index["chunks"]] == [f"chunk-0-{k}.bin" for k in range(manifest["chunks"])]
    source = ShardSource(shards)
    for i in (0, 37, 99):  # records hold the original file bytes, in folder order
        assert source.read_bytes(i) == files[i].read_bytes()
    assert source.describe(37) == f"{shards} record 37 ({files[37].stem})"


def test_pack_command_summarises_skipped_files_and_refuses_to_overwrite(tmp_path, capsys):
    folder = tmp_path / "faces"
    write_folder(folder, 6, 32)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert (
        pack_main([str(folder), str(tmp_path / "shards"), "--quiet", "--workers", "2", "--chunk-mb", "0.01"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed
    assert "packed 6 faces (6 x 32x32)" in printed and "1 skipped" in printed
    manifest = json.loads((tmp_path / "shards" / MANIFEST_NAME).read_text())
    assert "broken" not in manifest["names"] and len(manifest["skipped"]) == 1
    assert pack_main([str(folder), str(tmp_path / "shards"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert pack_main([str(tmp_path / "nothing"), str(tmp_path / "x"), "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="local folder"):
        pack(folder, "s3://bucket/faces")


def test_repacking_gives_byte_identical_shards_whatever_the_worker_count(tmp_path):
    folder = tmp_path / "faces"
    write_folder(folder, 20, 32)
    pack(folder, tmp_path / "a", workers=1)
    pack(folder, tmp_path / "b", workers=3)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) > 4
    for name in files:  # chunks, index.json (no time stamp) and the manifest
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_an_lmdb_packs_into_the_same_chunks_as_its_folder(tmp_path):
    folder = tmp_path / "faces"
    write_folder(folder, 10, 32)
    pack(folder, tmp_path / "from_folder")
    pack_lmdb(folder, tmp_path / "faces.lmdb")
    pack(tmp_path / "faces.lmdb", tmp_path / "from_lmdb")  # forked workers open the LMDB afresh
    chunks = sorted((tmp_path / "from_folder").glob("chunk-*.bin"))
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.read_bytes() == (tmp_path / "from_lmdb" / chunk.name).read_bytes()


def test_a_file_list_packs_the_listed_faces_in_its_order(tmp_path):
    folder = tmp_path / "faces"
    names = write_folder(folder, 10, 32)
    listed = [names[7], names[2], names[5]]
    (folder / "list.txt").write_text("# three faces\n" + "".join(f"{n}.png\n" for n in listed))
    manifest = pack(folder / "list.txt", tmp_path / "from_list")
    assert manifest["names"] == listed
    assert ShardSource(tmp_path / "from_list").read_bytes(1) == (folder / f"{names[2]}.png").read_bytes()
    with pytest.raises(FileNotFoundError, match="not found"):
        (folder / "bad.txt").write_text("missing.png\n")
        pack(folder / "bad.txt", tmp_path / "from_bad")


def test_shard_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="codeformer-pack-streaming"):
        ShardSource(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="litdata chunks without codeformer_faces.json"):
        ShardSource(tmp_path / "plain")
    with pytest.raises(ValueError, match="val_split=5: shards cannot hold faces out"):
        StreamingFaceDataModule(train_shards=str(tmp_path), image_size=32, val_split=5)
    with pytest.raises(ValueError, match="train_dir / train_lmdb must be null"):
        StreamingFaceDataModule(train_shards=str(tmp_path), train_dir=str(tmp_path), image_size=32)


# ----------------------------------------------------------------------------- the pairs and the order
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_samples_are_the_folder_datasets_pairs_and_cover_each_epoch_once(quickstart, workers):
    folder, shards = quickstart
    reference = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=5)
    loader = stream(shards, seed=5, batch_size=4, workers=workers)
    orders = []
    for epoch in range(2):
        reference.set_epoch(epoch)
        order = []
        for batch in loader:
            for j, i in enumerate(batch["index"].tolist()):
                expected = reference[i]
                assert batch["name"][j] == expected["name"]
                assert torch.equal(batch["gt"][j], expected["gt"]) and torch.equal(
                    batch["lq"][j], expected["lq"]
                )
            order += batch["index"].tolist()
        assert sorted(order) == list(range(100))  # 100 = 25 full batches: nothing left out
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled every epoch
    # the order comes from (seed, epoch): a new loader repeats it, another seed does not
    assert epoch_indices(stream(shards, seed=5, batch_size=4, workers=workers)) == orders[0]
    assert epoch_indices(stream(shards, seed=6, batch_size=4, workers=workers)) != orders[0]


def test_packed_latent_codes_come_with_the_flipped_face(tmp_path):
    folder = tmp_path / "faces"
    names = write_folder(folder, 8, 32)
    rng = np.random.default_rng(0)
    codes = {
        key: {n: torch.from_numpy(rng.integers(0, 1024, 16)) for n in names} for key in ("orig", "hflip")
    }
    save_latent_codes(codes, tmp_path / "codes.pth")
    manifest = pack(folder, tmp_path / "shards", latent_codes=tmp_path / "codes.pth")
    assert manifest["codes"] == {"length": 16, "dtype": "int16"}
    source = ShardSource(tmp_path / "shards")
    reference = FaceDataset(ImageFolderSource(folder), 32, "none", seed=1, latent_codes=codes)
    flips = 0
    for batch in stream(tmp_path / "shards", "none", seed=1, batch_size=2, codes=source.packed_codes()):
        for j, i in enumerate(batch["index"].tolist()):
            expected = reference[i]
            assert torch.equal(batch["codes"][j], expected["codes"]) and batch["codes"].dtype == torch.long
            flips += not torch.equal(expected["codes"], codes["orig"][expected["name"]])
    assert 0 < flips < 8  # both entries were used


def _split(shards, world: int, workers: int, batch_size: int, monkeypatch) -> list[list[int]]:
    """Indices each rank streams in epoch 0 (litdata reads the rank from WORLD_SIZE / GLOBAL_RANK)."""
    ranks = []
    for rank in range(world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = stream(shards, "none", batch_size=batch_size, workers=workers)
        ranks.append(epoch_indices(loader))
        assert len(ranks[-1]) == len(loader) * batch_size
    return ranks


@pytest.mark.parametrize(("world", "workers", "batch_size"), [(2, 0, 5), (3, 2, 3)])
def test_ranks_and_workers_share_an_epoch_without_overlap(
    quickstart, monkeypatch, world, workers, batch_size
):
    """In-process stand-in for the ranks (the real 2-process gloo run: test_streaming_ddp.py)."""
    _, shards = quickstart
    ranks = _split(shards, world, workers, batch_size, monkeypatch)
    used = [i for r in ranks for i in r]
    assert len(used) == len(set(used))  # disjoint
    assert len({len(r) for r in ranks}) == 1  # every rank the same number of full batches
    assert len(used) == 100 - 100 % (world * batch_size)  # complete up to the last partial round


# ----------------------------------------------------------------------------- bad records
def _corrupt_record(shards: Path, image_bytes: bytes) -> None:
    """Overwrite the middle of a record's image bytes inside its chunk file, as bit rot would."""
    for chunk in shards.glob("chunk-*.bin"):
        data = bytearray(chunk.read_bytes())
        at = data.find(image_bytes)
        if at >= 0:
            middle = at + len(image_bytes) // 2
            data[middle : middle + 64] = bytes(64)
            chunk.write_bytes(bytes(data))
            return
    raise AssertionError("record not found")


def _key(name: str, lq: torch.Tensor) -> tuple[str, bytes]:
    return name, lq.numpy().tobytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_record_is_skipped_named_and_replaced_as_in_the_folder(tmp_path, workers):
    folder = tmp_path / "faces"
    names = write_folder(folder, 12, 32)
    pack(folder, tmp_path / "shards")
    bad = folder / f"{names[5]}.png"
    _corrupt_record(tmp_path / "shards", bad.read_bytes())
    broken = bytearray(bad.read_bytes())
    broken[len(broken) // 2 : len(broken) // 2 + 64] = bytes(64)
    bad.write_bytes(bytes(broken))  # the folder's copy, damaged the same way
    reference = FaceDataset(ImageFolderSource(folder), 32, "stage2", seed=2)
    with pytest.warns(BadImageWarning, match=f"{names[5]}.png.*skipped"):
        expected = sorted(_key(s["name"], s["lq"]) for s in (reference[i] for i in range(12)))
    loader = stream(tmp_path / "shards", seed=2, batch_size=2, workers=workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sorted(_key(n, lq) for b in loader for n, lq in zip(b["name"], b["lq"]))
    assert got == expected  # the folder's samples: record 5's place taken by record 6, degraded as sample 5
    assert [n for n, _ in got].count(names[6]) == 2 and names[5] not in [n for n, _ in got]
    shard_name = f"{tmp_path / 'shards'} record 5 ({names[5]})"
    assert loader.dataset.faces.skipped_names() == [shard_name]  # seen by the main process, also from workers
    if workers == 0:  # (a worker's warning goes to its stderr; the epoch-end report names it in the log)
        messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
        assert len(messages) == 1 and shard_name in messages[0] and "skipped" in messages[0]


# ----------------------------------------------------------------------------- inside the fit loop
class _Recorder(pl.LightningModule):
    """Records what each training step sees: epoch, sample names, a checksum of the degraded inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            (self.current_epoch, tuple(batch["name"]), round(float(batch["lq"].double().sum()), 4))
        )
        return (self.w - batch["gt"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    shards: Path,
    workers: int,
    max_steps: int,
    ckpt_dir: Path | None = None,
    every: int = 0,
    resume=None,
    limit: int | None = None,
):
    dm = StreamingFaceDataModule(
        train_shards=str(shards), image_size=32, degradation="stage3_small", batch_size=2,
        num_workers=workers, pin_memory=False, seed=0,
    )  # fmt: skip
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=every,
                                         save_top_k=-1, auto_insert_metric_name=False))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
        limit_train_batches=limit, default_root_dir=ckpt_dir or shards.parent,  # never the working directory
    )  # fmt: skip
    module = _Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            ".*(many workers|num_workers|no validation faces|val_dataloader|callbacks used to create|LeafSpec).*",
        )
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module.seen


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    write_folder(root / "faces", 12, 32)
    pack(root / "faces", root / "shards")
    return root / "shards"


@pytest.mark.parametrize(
    ("workers", "stop_at", "limit"),
    [(0, 3, None), (2, 5, None), (0, 6, None), (2, 4, 4), pytest.param(2, 6, None, marks=pytest.mark.slow)],
)
def test_resumed_fit_sees_exactly_the_uninterrupted_batches(twelve_shards, tmp_path, workers, stop_at, limit):
    """12 faces in batches of 2: 6 steps per epoch (3 per loader worker with 2 workers). Steps 3 and 5
    stop mid-epoch, step 6 at an epoch's end, and with ``limit_train_batches=4`` step 4 ends an epoch
    that litdata's loader has not finished (its own count would resume inside it); the resumed runs
    cross two epoch boundaries. A checkpoint written at step ``stop_at`` is what a run killed after
    it leaves behind."""
    steps = 14 if limit is None else 10
    reference = _fit(twelve_shards, workers, steps, limit=limit)
    first = _fit(twelve_shards, workers, stop_at, tmp_path / "ckpt", every=stop_at, limit=limit)
    resumed = _fit(
        twelve_shards, workers, steps, resume=str(tmp_path / "ckpt" / f"step{stop_at}.ckpt"), limit=limit
    )
    assert first + resumed == reference
    per_epoch = limit or 6
    assert [epoch for epoch, *_ in reference] == [e for e in range(3) for _ in range(per_epoch)][:steps]
    names = sorted(json.loads((twelve_shards / MANIFEST_NAME).read_text())["names"])
    for epoch in (0, 1):  # every face once per epoch (at most once when the epoch is cut short)
        seen = sorted(n for e, batch, _ in reference if e == epoch for n in batch)
        assert seen == names if limit is None else len(set(seen)) == len(seen) == 2 * limit


def test_resuming_on_other_shards_warns_and_starts_the_epoch_over(twelve_shards, tmp_path):
    loader = stream(twelve_shards, batch_size=2, position=lambda: (1, 2))
    state = loader.state_dict()
    # epoch 1 (litdata counts it as its 2nd) after 2 batches of 2
    assert state["current_epoch"] == 2 and state["num_samples_yielded"] == 4
    write_folder(tmp_path / "other", 10, 32)
    pack(tmp_path / "other", tmp_path / "other_shards")
    other = stream(tmp_path / "other_shards", batch_size=2)
    with pytest.warns(UserWarning, match="epoch 1 starts over"):
        other.load_state_dict(state)
    assert other.current_epoch == 1 and len(epoch_indices(other)) == 10
    moved = tmp_path / "moved"
    shutil.copytree(twelve_shards, moved)  # the same shards elsewhere: the position carries over
    again = stream(moved, batch_size=2)
    again.load_state_dict(state)
    full = stream(twelve_shards, batch_size=2)
    list(full)  # epoch 0
    assert epoch_indices(again) == epoch_indices(full)[4:]


# ----------------------------------------------------------------------------- the config group
def test_data_streaming_config_builds_the_module_and_the_checks_accept_it(twelve_shards, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from codeformer_lightning.config_checks import ConfigError, check_config

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("codeformer_lightning.conf", version_base="1.3"):
            cfg = compose("train", overrides=["experiment=quickstart_vqgan", "data=streaming",
                                              f"data.train_shards={twelve_shards}", "data.num_workers=0"])  # fmt: skip
            missing = compose("train", overrides=["data=streaming", "data.train_shards=null"])
    finally:
        GlobalHydra.instance().clear()
    check_config(cfg)
    with pytest.raises(ConfigError, match="data=streaming data.train_shards="):
        check_config(missing)
    dm = instantiate(cfg.data)
    assert isinstance(dm, StreamingFaceDataModule) and dm.hparams.train_shards == str(twelve_shards)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and dm.val_set is None
    loader = dm.train_dataloader()
    assert isinstance(loader, StreamingFaceLoader) and len(loader) == 12 // int(cfg.data.batch_size)
    batch = next(iter(loader))
    assert batch["gt"].shape == (int(cfg.data.batch_size), 3, 32, 32) and torch.equal(
        batch["lq"], batch["gt"]
    )

"""Training samples per second from an image folder, an LMDB and litdata shards, same 512 px faces.

Each source goes through the training loader the data module builds for it (``FaceDataModule`` for
the folder and the LMDB: a ``ResumableLoader``; ``StreamingFaceDataModule`` for the shards: a
``StreamingFaceLoader``), shuffled, batches of 8, with the degradation ``none`` and no flips: what
is timed is reading + decoding (``codeformer_lightning.io``) + the two ``(3, 512, 512)`` tensors of a
sample, not the degradations. Per source and worker count (0 and 2): the latency of the first
batch of a fresh loader (worker start, litdata's epoch plan) and the samples per second of the
rest of the epoch; the ratios are against the folder at the same worker count. A second table
times the read path alone: the encoded bytes of every image in the main process, in a shuffled
order (litdata's own iteration for the shards), without decoding. Configurations run interleaved,
``--repeats`` times each; medians are printed.

The images: ``--count`` 512 px PNGs made offline from scikit-image's photographs (random crops,
flips, resized to 512, plus mild sensor noise so that PNG sizes resemble FFHQ's, ~0.5 MB), written
once into a temporary folder, then packed by ``pack_lmdb`` and ``pack_streaming``. Everything sits
on the local disk and in the page cache after the first pass, so the numbers compare the cost of
each read path on a CPU, not network storage (the reason shards exist at scale).

    python benchmarks/bench_data_sources.py                  # ~3 minutes on 2 idle cores
    python benchmarks/bench_data_sources.py --count 600 --repeats 3
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads BLAS
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from codeformer_lightning.data import FaceDataModule, ImageFolderSource, LmdbSource, pack_lmdb  # noqa: E402
from codeformer_lightning.data.pack_streaming import pack_streaming  # noqa: E402
from codeformer_lightning.data.streaming import StreamingFaceDataModule  # noqa: E402
from codeformer_lightning.io import write_image  # noqa: E402

SIZE = 512
BATCH = 8
SOURCES = ("folder", "lmdb", "streaming")


def make_faces(folder: Path, count: int, seed: int = 0) -> float:
    """``count`` 512 px PNGs from scikit-image's colour photographs; returns the mean file size (MB)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[y : y + side, x : x + side], (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        noisy = crop.astype(np.float32) + rng.normal(0.0, 3.0, crop.shape).astype(np.float32)
        write_image(folder / f"face_{k:04d}.png", np.clip(noisy, 0, 255).astype(np.uint8))
    return sum(p.stat().st_size for p in folder.iterdir()) / count / 2**20


def data_module(source: str, paths: dict[str, Path], workers: int):
    common = dict(image_size=SIZE, degradation="none", use_hflip=False, val_split=0, batch_size=BATCH,
                  num_workers=workers, pin_memory=False, persistent_workers=False, seed=0)  # fmt: skip
    if source == "streaming":
        return StreamingFaceDataModule(train_shards=str(paths["streaming"]), **common)
    key = {"folder": "train_dir", "lmdb": "train_lmdb"}[source]
    return FaceDataModule(**{key: str(paths[source])}, **common)


def one_epoch(source: str, paths: dict[str, Path], workers: int, spawn: bool) -> tuple[float, float, int]:
    """(first-batch seconds, samples/s after it, samples) of one epoch of a fresh loader."""
    dm = data_module(source, paths, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    if spawn:
        loader.multiprocessing_context = "spawn"
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    t_first = time.perf_counter()
    samples = 0
    for batch in iterator:
        samples += batch["gt"].shape[0]
    t_end = time.perf_counter()
    assert first["gt"].shape == (BATCH, 3, SIZE, SIZE)
    del iterator
    return t_first - start, samples / (t_end - t_first), samples + first["gt"].shape[0]


def bytes_only(source: str, paths: dict[str, Path], seed: int = 0) -> tuple[float, float]:
    """(records/s, MB/s) reading only the encoded bytes in the main process, in a shuffled order:
    the read path's own cost, without decoding."""
    if source == "streaming":
        from litdata import StreamingDataset

        records = StreamingDataset(str(paths["streaming"]), shuffle=True, seed=seed)
        start = time.perf_counter()
        sizes = [len(record["image"]) for record in records]
    else:
        src = ImageFolderSource(paths["folder"]) if source == "folder" else LmdbSource(paths["lmdb"])
        order = np.random.default_rng(seed).permutation(len(src))
        start = time.perf_counter()
        sizes = [len(src.read_bytes(int(i))) for i in order]
    seconds = time.perf_counter() - start
    return len(sizes) / seconds, sum(sizes) / 2**20 / seconds


def lmdb_needs_spawn(paths: dict[str, Path]) -> bool:
    """Whether the LMDB loader fails in forked workers (py-lmdb refuses to reopen an environment the
    parent process had open); then its rows with workers use spawn-started workers."""
    dm = data_module("lmdb", paths, 2)
    dm.setup("fit")
    try:
        next(iter(dm.train_dataloader()))
    except Exception as exc:  # noqa: BLE001 (the loader wraps the worker's lmdb.Error)
        if "already open" in str(exc):
            return True
        raise
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=304, help="number of 512 px images (default 304)")
    parser.add_argument("--repeats", type=int, default=2, help="epochs per configuration (default 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader workers (default 0 2)")
    parser.add_argument(
        "--workdir", default=None, help="keep the images and packs here (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        paths = {"folder": root / "faces", "lmdb": root / "faces.lmdb", "streaming": root / "shards"}
        t = time.perf_counter()
        mb = make_faces(paths["folder"], args.count)
        print(
            f"{args.count} images of {SIZE} px, {mb:.2f} MB each on average ({time.perf_counter() - t:.0f} s)"
        )
        t = time.perf_counter()
        pack_lmdb(paths["folder"], paths["lmdb"])
        t_lmdb = time.perf_counter() - t
        t = time.perf_counter()
        manifest = pack_streaming(paths["folder"], paths["streaming"], workers=2, progress=False)
        t_shards = time.perf_counter() - t
        print(f"packing: LMDB {t_lmdb:.1f} s (1 process), shards {t_shards:.1f} s (2 workers, "
              f"{manifest['chunks']} chunks of {manifest['records_per_chunk']})")  # fmt: skip
        spawn_lmdb = any(w > 0 for w in args.workers) and lmdb_needs_spawn(paths)
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        raw: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):  # interleaved: load changes affect every configuration alike
            for source in SOURCES:
                raw.setdefault(source, []).append(bytes_only(source, paths))
            for workers in args.workers:
                for source in SOURCES:
                    spawn = spawn_lmdb and source == "lmdb" and workers > 0
                    first, rate, n = one_epoch(source, paths, workers, spawn)
                    assert n == args.count - args.count % BATCH
                    results.setdefault((source, workers), []).append((first, rate))
        report(results, args.workers, spawn_lmdb)
        report_bytes(raw)


def report(results: dict, worker_counts: list[int], spawn_lmdb: bool) -> None:
    print(
        f"\nmedians of {len(next(iter(results.values())))} epochs; the machine may be shared (ratios come from one run)"
    )
    print(
        "| source | workers | first batch (s) | samples/s | vs folder (samples/s) | vs folder (first batch) |"
    )
    print("|---|---|---|---|---|---|")
    for workers in worker_counts:
        base_first = statistics.median(f for f, _ in results[("folder", workers)])
        base_rate = statistics.median(r for _, r in results[("folder", workers)])
        for source in SOURCES:
            first = statistics.median(f for f, _ in results[(source, workers)])
            rate = statistics.median(r for _, r in results[(source, workers)])
            note = " (spawn)" if spawn_lmdb and source == "lmdb" and workers > 0 else ""
            print(f"| {source}{note} | {workers} | {first:.3f} | {rate:.1f} | {rate / base_rate:.2f}x | "
                  f"{first / base_first:.2f}x |")  # fmt: skip
    if spawn_lmdb:
        print(
            "\n(spawn): LmdbSource cannot be read in fork-started workers (py-lmdb refuses to reopen an environment "
            "the parent had open), so these workers were started with spawn; their first batch includes that start"
        )


def report_bytes(raw: dict[str, list[tuple[float, float]]]) -> None:
    print("\nencoded bytes only (main process, shuffled order, no decoding):")
    print("| source | records/s | MB/s | vs folder |")
    print("|---|---|---|---|")
    base = statistics.median(r for r, _ in raw["folder"])
    for source in SOURCES:
        rate = statistics.median(r for r, _ in raw[source])
        mb = statistics.median(m for _, m in raw[source])
        print(f"| {source} | {rate:.0f} | {mb:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

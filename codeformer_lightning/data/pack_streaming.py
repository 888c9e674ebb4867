"""``codeformer-pack-streaming INPUT OUT``: faces into litdata's optimised chunks, for clusters.

INPUT is a folder of face images (searched recursively; ``--file-list`` picks some), an LMDB written
by ``codeformer-pack-lmdb``, or a text file listing image paths (one per line, relative to the
list's folder or absolute). OUT (a new local folder; upload it to object storage afterwards if the
cluster reads from there) receives:

* ``chunk-0-<k>.bin`` and ``index.json``: litdata chunks (``litdata.optimize``) of records
  ``{"image": original encoded bytes, "name": file stem}``, plus ``"codes_orig"`` / ``"codes_hflip"``
  (``(L,)`` int16 arrays) with ``--latent-codes`` (a ``codeformer-latent-codes`` file). Records
  keep the input's order; nothing is decoded or re-encoded, so training sees the input's pixels.
* ``codeformer_faces.json``: the names in record order, image sizes, the files left out and why.

Every image is first decoded by the package's one reader (:func:`codeformer_lightning.io.decode_image`)
in parallel worker processes, with a progress bar; unreadable files are left out and listed with
the reason. Packing is reproducible: the same input gives byte-identical chunks, ``index.json`` and
manifest, whatever the number of workers (each chunk holds a fixed number of records, derived from
``--chunk-mb`` and the mean file size; the chunks are numbered in record order and ``index.json``'s
``updated_at``, litdata's cache key, is a hash of the chunks instead of a time).

    codeformer-pack-streaming data/ffhq_512 data/ffhq_512_shards --latent-codes weights/latent_codes.pth
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing as mp
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import BadImageError, decode_image
from .datasets import ImageFolderSource, ImageSource
from .latent_codes import CODE_KEYS, read_latent_codes
from .lmdb import LmdbSource
from .streaming import INDEX_NAME, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, is_remote

# litdata asks PyPI for newer releases of itself when LITDATA_CHECK_UPDATES is set; never here
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
from litdata import optimize  # noqa: E402  (after the switch above; streaming explains a missing litdata)

#: default target size of a chunk (see README "Training on a cluster" for the trade-off)
DEFAULT_CHUNK_MB = 16


def open_input(path: str | os.PathLike, file_list: str | os.PathLike | None = None) -> ImageSource:
    """The images of INPUT: a folder (optionally ``file_list``), an LMDB of ``codeformer-pack-lmdb``,
    or a text file listing image paths."""
    path = Path(path)
    if path.is_dir() and (path / "data.mdb").is_file():
        if file_list is not None:
            raise ValueError(f"{path} is an LMDB: --file-list selects files of a folder")
        return LmdbSource(path)
    if path.is_file():
        if file_list is not None:
            raise ValueError(f"{path} is a file list already: --file-list selects files of a folder")
        return ImageFolderSource(path.parent, path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder, LMDB or file list")
    return ImageFolderSource(path, file_list)


def _check(index: int, source: ImageSource, decode: bool) -> tuple[int, str | None, str, int]:
    """``(index, reason it cannot be used or None, "WxH" or "", bytes)`` of image ``index``."""
    origin = source.describe(index)
    try:
        data = source.read_bytes(index)
    except (OSError, KeyError) as exc:
        return index, f"{origin}: cannot read ({exc})", "", 0
    if not decode:
        return index, None, "", len(data)
    try:
        image = decode_image(data, origin)
    except BadImageError as exc:
        return index, str(exc), "", len(data)
    return index, None, f"{image.shape[1]}x{image.shape[0]}", len(data)


def _record(index: int, source: ImageSource, codes: dict | None) -> dict:
    """The record of image ``index`` (runs in litdata's worker processes)."""
    name = source.names[index]
    record = {"image": source.read_bytes(index), "name": name}
    if codes is not None:
        for key in CODE_KEYS:
            record[f"codes_{key}"] = codes[key][name]
    return record


def _start_method(source: ImageSource) -> str:
    """How worker processes start: ``fork`` where the platform has it (workers inherit the source
    and codes instead of unpickling them, and start in milliseconds instead of re-importing torch)."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def check_images(
    source: ImageSource, workers: int, decode: bool = True, progress: bool = True
) -> list[tuple[int, str | None, str, int]]:
    """:func:`_check` of every image, in order, on ``workers`` processes with a progress bar."""
    check = functools.partial(_check, source=source, decode=decode)
    indices = range(len(source))
    bar = dict(total=len(source), desc="checking" if decode else "sizing", unit="img", disable=not progress)
    if workers <= 1:
        return list(tqdm(map(check, indices), **bar))
    with mp.get_context(_start_method(source)).Pool(workers) as pool:
        return list(tqdm(pool.imap(check, indices, chunksize=16), **bar))


def _compact_codes(codes: dict, names: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """The codes of ``names`` as small integer arrays (int16 when they fit; numpy, which litdata
    hands back without complaint from its read-only memory maps)."""
    missing = [n for n in names if n not in codes["orig"] or n not in codes["hflip"]]
    if missing:
        raise KeyError(
            f"{len(missing)} faces have no codes in the latent-code file (e.g. {missing[:5]}): "
            "write it with codeformer-latent-codes for these faces"
        )
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in CODE_KEYS:
        top = max(int(codes[key][n].max()) for n in names)
        dtype = np.int16 if top < 2**15 else np.int32
        out[key] = {n: np.ascontiguousarray(codes[key][n].reshape(-1).numpy(), dtype=dtype) for n in names}
    return out


def _normalise_chunks(out: Path) -> str:
    """Name the chunks ``chunk-0-<k>.bin`` in record order and make ``updated_at`` (litdata's cache
    key) a hash of their bytes, so the folder does not depend on the worker count or the time.
    Returns that hash (hex)."""
    index_path = out / INDEX_NAME
    index = json.loads(index_path.read_text())
    digest = hashlib.sha256()
    temporary = []
    for k, chunk in enumerate(index["chunks"]):
        src = out / chunk["filename"]
        digest.update(hashlib.sha256(src.read_bytes()).digest())
        tmp = out / f".renaming-{k}.bin"
        src.rename(tmp)
        temporary.append(tmp)
        chunk["filename"] = f"chunk-0-{k}.bin"
    for k, tmp in enumerate(temporary):
        tmp.rename(out / f"chunk-0-{k}.bin")
    index["updated_at"] = digest.hexdigest()[:32]
    index_path.write_text(json.dumps(index, sort_keys=True))
    return digest.hexdigest()


def _optimize(
    source: ImageSource, good: list[int], out: Path, per_chunk: int, codes: dict | None, workers: int
) -> None:
    """litdata's ``optimize`` of the records ``good`` into ``out``, in input order."""
    optimize(
        fn=functools.partial(_record, source=source, codes=codes),
        inputs=good,
        output_dir=str(out),
        chunk_size=per_chunk,
        align_chunking=True,  # chunk boundaries independent of the worker count
        num_workers=min(workers, -(-len(good) // per_chunk)),  # no idle workers
        keep_data_ordered=True,  # records in input order (record i = the i-th good face)
        reorder_files=False,
        start_method=_start_method(source),
        verbose=False,
    )


def pack_streaming(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    file_list: str | os.PathLike | None = None,
    latent_codes: str | os.PathLike | None = None,
    workers: int | None = None,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    check: bool = True,
    progress: bool = True,
) -> dict:
    """Pack the faces of ``input_path`` into the new shard folder ``out`` (see the module docstring).

    Returns the manifest (also written to ``out/codeformer_faces.json``): ``count``, ``names`` in
    record order, ``sizes`` (``{"WxH": n}``; empty without ``check``), ``records_per_chunk``,
    ``chunks``, ``chunks_sha256`` (the content of the chunks, in order), ``codes``
    (``{"length", "dtype"}`` or None), ``source``, ``skipped`` ("file: reason" strings).
    """
    if is_remote(out):
        raise ValueError(f"{out}: pack into a local folder, then copy it to object storage (README)")
    source = open_input(input_path, file_list)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or choose another folder")
    duplicates = sorted(n for n, c in Counter(source.names).items() if c > 1)
    if duplicates:
        raise ValueError(
            f"face names (file stems) must be unique, they name the records: duplicates {duplicates[:5]}"
        )
    if chunk_mb <= 0:
        raise ValueError(f"chunk_mb must be > 0, got {chunk_mb}")
    codes = read_latent_codes(latent_codes) if latent_codes is not None else None
    workers = max(1, int(workers if workers is not None else min(8, os.cpu_count() or 1)))

    results = check_images(source, workers, decode=check, progress=progress)
    good = [i for i, reason, _, _ in results if reason is None]
    skipped = [reason for _, reason, _, _ in results if reason is not None]
    if not good:
        raise ValueError(f"none of the {len(source)} images of {input_path} can be used: {skipped[:3]}")
    names = [source.names[i] for i in good]
    packed_codes = _compact_codes(codes, names) if codes is not None else None
    mean_bytes = sum(size for i, reason, _, size in results if reason is None) / len(good)
    per_chunk = max(1, round(chunk_mb * 2**20 / max(mean_bytes, 1.0)))

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # about idle workers when a chunk outgrows the input: there are none
        warnings.filterwarnings("ignore", message="chunk_size .* is too large")
        _optimize(source, good, out, per_chunk, packed_codes, workers)
    content = _normalise_chunks(out)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "count": len(names),
        "names": names,
        "sizes": dict(
            sorted(Counter(size for _, reason, size, _ in results if reason is None and size).items())
        ),
        "records_per_chunk": per_chunk,
        "chunks": len(json.loads((out / INDEX_NAME).read_text())["chunks"]),
        "chunks_sha256": content,
        "codes": None,
        "source": str(Path(input_path).resolve()),
        "skipped": skipped,
    }
    if packed_codes is not None:
        first = packed_codes["orig"][names[0]]
        manifest["codes"] = {"length": int(first.size), "dtype": str(first.dtype)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``codeformer-pack-streaming INPUT OUT``."""
    parser = argparse.ArgumentParser(
        prog="codeformer-pack-streaming",
        description="Pack aligned faces into litdata chunks (original file bytes + names, optionally latent codes) "
        "for data=streaming.",
    )
    parser.add_argument(
        "input", help="image folder, LMDB of codeformer-pack-lmdb, or text file of image paths"
    )
    parser.add_argument("out", help="shard folder to create (local; copy it to object storage afterwards)")
    parser.add_argument(
        "--file-list", default=None, help="text file of paths relative to the INPUT folder to pack"
    )
    parser.add_argument(
        "--latent-codes", default=None, help="codeformer-latent-codes file: pack each face's codes"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_MB,
        help=f"target chunk size in MB (default {DEFAULT_CHUNK_MB})",
    )
    parser.add_argument("--no-check", action="store_true", help="do not decode every image before packing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = pack_streaming(
            args.input, args.out, args.file_list, args.latent_codes, args.workers, args.chunk_mb,
            check=not args.no_check, progress=not args.quiet,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    for reason in manifest["skipped"]:
        print(f"skipped {reason}")
    sizes = ", ".join(f"{n} x {s}" for s, n in manifest["sizes"].items()) or "not checked"
    codes = f", latent codes of length {manifest['codes']['length']}" if manifest["codes"] else ""
    print(
        f"packed {manifest['count']} faces ({sizes}){codes} into {manifest['chunks']} chunks of "
        f"{manifest['records_per_chunk']} in {args.out}; {len(manifest['skipped'])} skipped"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

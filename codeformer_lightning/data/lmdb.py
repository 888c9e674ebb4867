"""Face images in an LMDB file: fast random access on network file systems.

Layout (``codeformer-pack-lmdb FOLDER OUT.lmdb``): one key per image, the file stem (UTF-8), whose
value is the image file's original bytes (PNG/JPEG/..., nothing re-encoded, so pixels are exactly
those of the folder); ``__keys__``: JSON list of the image keys in folder order; ``__meta__``:
JSON ``{"count", "sizes": {"WxH": n}, "source", "format_version"}``.

    codeformer-pack-lmdb data/ffhq_512 data/ffhq_512_train.lmdb
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import lmdb

from ..io import BadImageError, decode_image
from .datasets import list_image_files

KEYS_KEY = b"__keys__"
META_KEY = b"__meta__"
FORMAT_VERSION = 1

#: one read-only handle per LMDB and process (py-lmdb refuses to open an environment twice in a
#: process, and handles must not be used across a fork: the pid is part of the key)
_ENVIRONMENTS: dict[tuple[str, int], lmdb.Environment] = {}


def _open_readonly(path: Path) -> lmdb.Environment:
    key = (str(path.resolve()), os.getpid())
    env = _ENVIRONMENTS.get(key)
    if env is None:
        # py-lmdb refuses to open a path twice in one process, and a forked data-loader worker
        # inherits the parent's open environment: drop the inherited handle (never used here) first
        for other in [k for k in _ENVIRONMENTS if k[0] == key[0] and k[1] != key[1]]:
            _ENVIRONMENTS.pop(other).close()
        env = lmdb.open(
            key[0],
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            subdir=path.is_dir(),
            max_readers=2048,
        )
        _ENVIRONMENTS[key] = env
    return env


class LmdbSource:
    """Images of a packed LMDB (see the module docstring); names are the keys.

    The environment is opened lazily (readonly, ``lock=False``) in the process that first reads,
    so every data-loader worker holds its own handle (LMDB handles must not cross a fork).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"LMDB {self.path} does not exist (pack a folder with codeformer-pack-lmdb)"
            )
        with _open_readonly(self.path).begin() as txn:
            raw_keys = txn.get(KEYS_KEY)
            raw_meta = txn.get(META_KEY)
        if raw_keys is None:
            raise ValueError(
                f"{self.path}: not a face LMDB ({KEYS_KEY.decode()} missing; pack it with codeformer-pack-lmdb)"
            )
        self.names: list[str] = json.loads(raw_keys)
        self.meta: dict = json.loads(raw_meta) if raw_meta else {}
        if not self.names:
            raise FileNotFoundError(f"LMDB {self.path} holds no images")
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, None  # reopened in the receiving process
        return state

    def read_bytes(self, index: int) -> bytes:
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open_readonly(self.path), os.getpid()
        with self._env.begin(buffers=False) as txn:
            value = txn.get(self.names[index].encode())
        if value is None:
            raise KeyError(f"key {self.names[index]!r} missing")
        return value

    def describe(self, index: int) -> str:
        return f"{self.path}[{self.names[index]}]"


def pack_lmdb(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    file_list: str | os.PathLike | None = None,
    check: bool = True,
) -> dict:
    """Pack the images under ``folder`` into the LMDB ``out`` (a new folder); returns the meta dict.

    With ``check``, every image is decoded first: unreadable files are left out with a message
    (returned under ``meta["skipped"]``). Stems must be unique (they are the keys).
    """
    paths = list_image_files(folder, file_list)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another name")
    stems = Counter(p.stem for p in paths)
    dupes = sorted(s for s, n in stems.items() if n > 1)
    if dupes:
        raise ValueError(
            f"image names (file stems) must be unique, they are the LMDB keys: duplicates {dupes[:5]}"
        )
    total = sum(p.stat().st_size for p in paths)
    env = lmdb.open(
        str(out), map_size=int(total * 1.5) + (64 << 20), subdir=True, meminit=False, map_async=True
    )
    keys: list[str] = []
    sizes: Counter[str] = Counter()
    skipped: list[str] = []
    try:
        txn = env.begin(write=True)
        for i, path in enumerate(paths):
            data = path.read_bytes()
            if check:
                try:
                    image = decode_image(data, str(path))
                except BadImageError as exc:
                    skipped.append(str(exc))
                    continue
                sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
            txn.put(path.stem.encode(), data)
            keys.append(path.stem)
            if (i + 1) % 1000 == 0:  # bounded transactions
                txn.commit()
                txn = env.begin(write=True)
        meta = {
            "count": len(keys),
            "sizes": dict(sizes),
            "source": str(Path(folder).resolve()),
            "format_version": FORMAT_VERSION,
            "skipped": skipped,
        }
        txn.put(KEYS_KEY, json.dumps(keys).encode())
        txn.put(META_KEY, json.dumps(meta).encode())
        txn.commit()
        env.sync()
    finally:
        env.close()
    return meta


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``codeformer-pack-lmdb FOLDER OUT.lmdb``."""
    parser = argparse.ArgumentParser(
        prog="codeformer-pack-lmdb",
        description="Pack a folder of aligned face images into an LMDB (original file bytes, one key per image).",
    )
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("out", help="LMDB to create (a folder, e.g. ffhq_512_train.lmdb)")
    parser.add_argument(
        "--file-list", default=None, help="text file of relative paths to pack (default: all images)"
    )
    parser.add_argument("--no-check", action="store_true", help="do not decode every image before packing")
    args = parser.parse_args(argv)
    try:
        meta = pack_lmdb(args.folder, args.out, args.file_list, check=not args.no_check)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for message in meta["skipped"]:
        print(f"skipped {message}")
    sizes = ", ".join(f"{n} x {s}" for s, n in sorted(meta["sizes"].items())) or "not checked"
    print(f"packed {meta['count']} images ({sizes}) into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training from litdata shards: faces packed once, streamed to every rank of a cluster.

``codeformer-pack-streaming`` (:mod:`.pack_streaming`) writes litdata's optimised chunks: each
record holds one face's *original encoded bytes* and its name (and, optionally, its latent codes
``orig`` / ``hflip``), in the order of the input, plus ``codeformer_faces.json`` (the names in
record order, the packing summary). Nothing is decoded or degraded at packing time: the shards hold
bytes, not tensors, so the degradations stay those of the training config.

Reading, here:

* :class:`ShardSource` is an image source of :class:`~.datasets.FaceDataset` (names, bytes,
  descriptions): record ``i`` of the shards is sample ``i``. So the pixels, flips, degradations,
  latent codes, the ``(seed, epoch, index)`` seeding and the handling of bad records (skipped with a
  :class:`~.datasets.BadImageWarning` naming the record, replaced by the next good one) are the
  folder dataset's, and sample ``i`` of epoch ``e`` is the pair ``FaceDataset`` gives for the
  folder's ``i``-th face (the folder packed without bad files).
* :class:`StreamingFaceDataset` is litdata's ``StreamingDataset`` over the same shards: litdata
  orders each epoch (chunks shuffled from ``(seed, epoch)``, then the items inside each chunk),
  splits it over ranks and loader workers without overlap, downloads and caches the chunks of a
  remote ``input_dir``, and reads each record; the sample is then built by the ``FaceDataset``.
* :class:`StreamingFaceLoader` is litdata's ``StreamingDataLoader`` (its state, saved in Lightning
  checkpoints, resumes an epoch in the middle) with two corrections for the fit loop. Its saved
  position is the training loop's (the data module's ``position``, as for the folder loader), not
  the batches litdata handed out: an epoch the fit loop ends early (``limit_train_batches``) is
  over, not half done, and nothing fetched ahead counts. And a restored position serves one
  iteration only: litdata keeps it until an iterator runs dry, which the fit loop never asks for
  (it stops at its number of batches), so the epoch after a resumed one would replay it.
* :class:`StreamingFaceDataModule` is :class:`~.datamodule.FaceDataModule` with its training set
  read from the shards (``data=streaming``); validation reads a folder, an LMDB or other shards.

Remote ``input_dir`` (``s3://bucket/faces``, ``gs://...``, ``azure://...``) goes to litdata's own
client (see the README section "Training on a cluster" for credentials and caching).

Every epoch uses full batches only (litdata's ``drop_last``): each worker of each rank gets a whole
number of batches, all ranks the same number, and fewer than ``ranks x batch_size`` records are left
out of an epoch (the tail of that epoch's chunk order, so different records each epoch).
Loader workers are never persistent here: litdata keeps an epoch's position in each worker's copy of
the dataset, which fresh workers take from the main process at every epoch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datamodule import FaceDataModule
from .datasets import FaceDataset
from .latent_codes import CODE_KEYS, read_latent_codes
from .loaders import Position, _mixed_seed

# litdata asks PyPI for newer releases of itself when LITDATA_CHECK_UPDATES is set; never at run time
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
try:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.downloader import get_downloader
    from litdata.streaming.sampler import ChunkedIndex
except ImportError as exc:  # the [streaming] extra is optional
    raise ImportError(
        "streaming shards need litdata: pip install 'codeformer_lightning[streaming]' 'torchvision==0.28.*' "
        "(torchvision pinned to the release of torch 2.13, or pip replaces torch; see README 'Training on a cluster')"
    ) from exc

log = logging.getLogger(__name__)

#: the file next to litdata's ``index.json`` that makes a folder of chunks a face shard folder
MANIFEST_NAME = "codeformer_faces.json"
MANIFEST_FORMAT = "codeformer-faces"
MANIFEST_VERSION = 1
#: litdata's index of the chunks
INDEX_NAME = "index.json"


def _plain(value: Any) -> Any:
    """Mappings (e.g. a config's ``storage_options``) as plain dicts, for litdata's clients."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def is_remote(input_dir: str | os.PathLike) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ...), read through litdata's client."""
    return "://" in str(input_dir)


# ----------------------------------------------------------------------------- the shard folder
def read_manifest(input_dir: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The ``codeformer_faces.json`` of a shard folder (local, or fetched with litdata's client).

    Raises FileNotFoundError for a missing local folder and ValueError for a folder that was not
    written by ``codeformer-pack-streaming``.
    """
    input_dir = str(input_dir)
    if is_remote(input_dir):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, MANIFEST_NAME)
            try:
                downloader = get_downloader(input_dir, tmp, [], storage_options)
                downloader.download_file(f"{input_dir.rstrip('/')}/{MANIFEST_NAME}", local)
                text = Path(local).read_text()
            except Exception as exc:  # the client's own errors: missing object, credentials, network
                raise ValueError(
                    f"{input_dir}: cannot read {MANIFEST_NAME} ({type(exc).__name__}: {exc}); is it a shard folder "
                    "written by codeformer-pack-streaming, and are the credentials set (README 'Training on a cluster')?"
                ) from exc
    else:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such shard folder (write one with codeformer-pack-streaming FACES {folder})"
            )
        if not (folder / MANIFEST_NAME).is_file():
            what = "litdata chunks" if (folder / INDEX_NAME).is_file() else "no litdata chunks"
            raise ValueError(
                f"{folder}: {what} without {MANIFEST_NAME}: not a face shard folder "
                "(pack faces with codeformer-pack-streaming)"
            )
        text = (folder / MANIFEST_NAME).read_text()
    manifest = json.loads(text)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
        raise ValueError(
            f"{input_dir}/{MANIFEST_NAME}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, this release reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}"
        )
    return manifest


class ShardSource:
    """The faces of a shard folder as an image source of :class:`~.datasets.FaceDataset`.

    ``names[i]`` is record ``i``'s face (``codeformer_faces.json``). ``read_bytes(i)`` returns the
    record a :class:`StreamingFaceDataset` just streamed when it is record ``i`` (:meth:`hold`), and
    otherwise reads record ``i`` by random access (a replacement for a bad record, validation
    shards) through a litdata reader of its own, opened lazily in each process.

    Args:
        input_dir: the shard folder or its object-store URI.
        cache_dir / storage_options: litdata's (where remote chunks are cached; credentials, endpoint).
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        storage_options: dict | None = None,
    ) -> None:
        self.input_dir = str(input_dir)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.storage_options = _plain(storage_options) or None
        self.manifest = read_manifest(self.input_dir, self.storage_options)
        self.names: list[str] = list(self.manifest["names"])
        self.has_codes = self.manifest.get("codes") is not None
        self._positions: dict[str, int] | None = None
        self._held: tuple[int, dict | None, str] | None = None
        self._reader: StreamingDataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"], state["_held"] = None, None, None  # per process
        return state

    def describe(self, index: int) -> str:
        return f"{self.input_dir} record {index} ({self.names[index]})"

    def hold(self, index: int, record: dict | None, error: str = "") -> None:
        """Record ``index`` as just streamed (None with ``error``: litdata could not read it)."""
        self._held = (int(index), record, error)

    def record(self, index: int) -> dict:
        """Record ``index``: ``{"image": bytes, "name": str[, "codes_orig", "codes_hflip": (L,) int arrays]}``.

        Raises OSError for a record that cannot be read or holds another face than the manifest says.
        """
        index = int(index)
        if self._held is not None and self._held[0] == index:
            _, record, error = self._held
        else:
            record, error = self._read(index)
        if record is None:
            raise OSError(f"unreadable record ({error})")
        if record.get("name") != self.names[index]:
            raise OSError(
                f"the record holds face {record.get('name')!r}, {MANIFEST_NAME} says {self.names[index]!r} "
                "(chunks changed after packing?)"
            )
        return record

    def _read(self, index: int) -> tuple[dict | None, str]:
        if self._reader is None or self._pid != os.getpid():
            self._reader = StreamingDataset(
                self.input_dir, cache_dir=self.cache_dir, storage_options=self.storage_options
            )
            self._pid = os.getpid()
        try:
            return self._reader[index], ""
        except Exception as exc:  # a damaged chunk: litdata's parser fails in many ways
            return None, f"{type(exc).__name__}: {exc}"

    def read_bytes(self, index: int) -> bytes:
        return self.record(index)["image"]

    def position_of(self, name: str) -> int:
        if self._positions is None:
            self._positions = {n: i for i, n in enumerate(self.names)}
        return self._positions[name]

    def packed_codes(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The latent codes packed with the faces, as a latent-code mapping (read with each record)."""
        if not self.has_codes:
            raise ValueError(
                f"{self.input_dir}: packed without latent codes (codeformer-pack-streaming --latent-codes)"
            )
        return {key: PackedCodes(self, key) for key in CODE_KEYS}


class PackedCodes(Mapping):
    """``name -> (L,) codes`` of one entry (``orig`` / ``hflip``) of the codes packed in the shards:
    the ``latent_codes`` of a :class:`~.datasets.FaceDataset` over a :class:`ShardSource`."""

    def __init__(self, source: ShardSource, key: str) -> None:
        self.source, self.key = source, key

    def __getitem__(self, name: str) -> torch.Tensor:
        packed = self.source.record(self.source.position_of(name))[f"codes_{self.key}"]
        return torch.from_numpy(np.array(packed, dtype=np.int64))  # a copy: records are read-only memory maps

    def __contains__(self, name: object) -> bool:
        try:
            self.source.position_of(name)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.names)

    def __len__(self) -> int:
        return len(self.source)


# ----------------------------------------------------------------------------- streaming
class StreamingFaceDataset(StreamingDataset):
    """litdata's streaming of a shard folder, with the samples of a :class:`~.datasets.FaceDataset`.

    Iterating yields this rank's and this loader worker's share of the current epoch in litdata's
    order (see the module docstring); each item is ``faces[i]`` for the record ``i`` streamed, at
    the epoch being iterated (litdata counts epochs from 1, the dataset from 0 like the trainer).

    Args:
        faces: the samples; its source is a :class:`ShardSource` over all the records (no subset).
        seed: litdata's shuffling seed (the data module passes its own seed).
        shuffle: shuffle every epoch (chunks, then items inside each chunk).
        cache_dir, max_cache_size, storage_options, max_pre_download: litdata's, for remote shards
            (where chunks are cached, how much of the disk they may take, credentials/endpoint, how
            many chunks each worker downloads ahead).
    """

    def __init__(
        self,
        faces: FaceDataset,
        seed: int = 0,
        shuffle: bool = True,
        cache_dir: str | os.PathLike | None = None,
        max_cache_size: int | str | None = None,
        storage_options: dict | None = None,
        max_pre_download: int = 2,
    ) -> None:
        source = faces.source
        if not isinstance(source, ShardSource):
            raise TypeError(
                f"StreamingFaceDataset needs a FaceDataset over a ShardSource, got {type(source).__name__}"
            )
        if faces.indices != list(range(len(source))):
            raise ValueError(
                "StreamingFaceDataset streams every record: its FaceDataset must not select a subset"
            )
        super().__init__(
            source.input_dir,
            cache_dir=None if cache_dir is None else str(cache_dir),
            shuffle=shuffle,
            drop_last=True,  # full batches, the same number on every rank
            seed=int(seed),
            max_cache_size=max_cache_size,
            storage_options=_plain(storage_options) or None,
            max_pre_download=max_pre_download,
        )
        self.faces = faces

    @property
    def source(self) -> ShardSource:
        return self.faces.source  # type: ignore[return-value]

    def __iter__(self) -> StreamingFaceDataset:
        super().__iter__()  # litdata sets the epoch (restored from a checkpoint's state when resuming)
        self.faces.set_epoch(self.current_epoch - 1)
        return self

    def __getitem__(self, index: ChunkedIndex | int) -> dict:
        """Sample of record ``index`` (a ChunkedIndex while streaming; an int reads it directly)."""
        if not isinstance(index, ChunkedIndex):
            return self.faces[int(index)]
        try:
            record, error = super().__getitem__(index), ""
        except Exception as exc:  # a damaged chunk: the FaceDataset skips the record and says why
            record, error = None, f"{type(exc).__name__}: {exc}"
        self.source.hold(index.index, record, error)
        return self.faces[index.index]


class StreamingFaceLoader(StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` whose saved position is the training loop's (see the module
    docstring).

    ``position``: ``() -> (epoch, batches consumed)`` as the training loop sees it (the data
    module's); None saves litdata's own count (batches handed out). ``epoch``: the trainer's epoch
    when the loader is made (the next iteration is that epoch). Worker seeds come from the loader's
    own generator, reseeded from ``(seed, epoch, rank)``: iterating never draws from the global
    torch generator. ``state_dict`` also records a fingerprint of the shards (record count and
    content hash, from the manifest) and the seed; resuming on other shards, or with another seed,
    warns and starts the epoch over; the same shards at another path or mount continue.
    """

    def __init__(
        self,
        dataset: StreamingFaceDataset,
        batch_size: int,
        position: Position | None = None,
        epoch: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, StreamingFaceDataset):
            raise TypeError(f"StreamingFaceLoader needs a StreamingFaceDataset, got {type(dataset).__name__}")
        kwargs.pop("persistent_workers", None)  # see the module docstring
        kwargs.pop("generator", None)
        super().__init__(
            dataset, batch_size=batch_size, drop_last=True, generator=torch.Generator(), **kwargs
        )
        self.position = position
        self.current_epoch = int(epoch)  # litdata's count of epochs started; its next one is epoch + 1
        self._resuming = False

    def __iter__(self):
        # the restored position (litdata's ``restore``) serves the first iteration after
        # load_state_dict only (see the module docstring)
        if not self._resuming:
            self.restore = False
        self._resuming = False
        return super().__iter__()

    def _get_iterator(self):
        rank = self.dataset.distributed_env.global_rank
        self.generator.manual_seed(_mixed_seed(self.dataset.seed, self.current_epoch, rank, 1))
        return super()._get_iterator()

    def _fingerprint(self) -> dict[str, Any]:
        manifest = self.dataset.source.manifest
        return {
            "records": manifest["count"],
            "chunks_sha256": manifest["chunks_sha256"],
            "seed": self.dataset.seed,
        }

    @staticmethod
    def _epoch_of(state: dict[str, Any]) -> int:
        """The trainer's epoch a saved state resumes (litdata counts epochs started, from 1)."""
        started = int(state["current_epoch"])
        return started - 1 if state["num_samples_yielded"] else started

    def state_dict(self) -> dict[str, Any]:
        if self.position is None:
            return dict(super().state_dict(), codeformer=self._fingerprint())
        epoch, batches = self.position()
        # litdata's state after handing out exactly the consumed batches: workers take turns, so the
        # last of them came from worker (batches - 1) mod W; an epoch not begun is the previous one done
        samples = int(batches) * int(self.batch_size)
        started = int(epoch) + 1 if batches > 0 else int(epoch)
        dataset_state = dict(self.dataset.state_dict(samples, self.num_workers, self.batch_size))
        dataset_state.update(current_epoch=started, num_samples_yielded=samples)
        return {
            "dataset": dataset_state,
            "current_epoch": started,
            "num_samples_yielded": samples,
            "latest_worker_idx": (int(batches) - 1) % max(self.num_workers, 1),
            "codeformer": self._fingerprint(),
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        saved, here = obj.get("codeformer"), self._fingerprint()
        epoch = self._epoch_of(obj)
        if saved != here:
            warnings.warn(
                f"the checkpoint's training shards ({saved}) are not these ({here}): the data order cannot "
                f"continue, epoch {epoch} starts over",
                stacklevel=2,
            )
            self.current_epoch = epoch
            return
        # the same shards, maybe at another path or mount: litdata checks the folder by name
        state = dict(obj["dataset"])
        state.update(input_dir_path=self.dataset.input_dir.path, input_dir_url=self.dataset.input_dir.url)
        state["cache_dir_path"] = self.dataset.cache_dir.path
        super().load_state_dict(dict(obj, dataset=state))
        self._resuming = self.restore
        log.info(
            "training shards resume epoch %d after %d samples on this rank",
            epoch,
            int(obj["num_samples_yielded"]),
        )


# ----------------------------------------------------------------------------- the data module
class StreamingFaceDataModule(FaceDataModule):
    """:class:`~.datamodule.FaceDataModule` whose training faces stream from a shard folder.

    Args:
        train_shards: shard folder or object-store URI (``codeformer-pack-streaming`` output).
        val_shards: validation shards (read by random access); or the folder module's ``val_dir``
            / ``val_lmdb``. Shards cannot hold faces out: ``val_split`` must be 0.
        cache_dir: where remote chunks are cached on each node (default: litdata's,
            ``~/.lightning/chunks``); ``max_cache_size``: how much of that disk they may take
            (e.g. ``"100GB"``; default: litdata's, 75% of the free space).
        storage_options: litdata's client options (e.g. ``{"endpoint_url": ...}`` for S3-compatible stores).
        max_pre_download: chunks each loader worker downloads ahead.
        shuffle: shuffle every epoch (litdata: chunks, then the items inside each chunk).
        **options: every other :class:`~.datamodule.FaceDataModule` argument (image size,
            degradations, task, batch size, workers, seed, latent codes, ...). ``latent_codes``
            (a file) takes precedence over codes packed in the shards.
    """

    def __init__(
        self,
        train_shards: str | os.PathLike,
        val_shards: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_cache_size: int | str | None = None,
        storage_options: dict | None = None,
        max_pre_download: int = 2,
        shuffle: bool = True,
        **options: Any,
    ) -> None:
        options.setdefault("val_split", 0)
        if options.get("file_list") is not None:
            raise ValueError(
                "data=streaming reads whole shard folders: pack the listed faces instead "
                "(codeformer-pack-streaming LIST.txt OUT)"
            )
        if int(options["val_split"]) > 0:
            raise ValueError(
                f"val_split={options['val_split']}: shards cannot hold faces out; pack a validation set "
                "(val_shards) or give val_dir / val_lmdb, or set val_split=0"
            )
        self._shards = (train_shards, val_shards)  # for _check_sources, called by FaceDataModule.__init__
        super().__init__(**options)  # hparams also holds this class's arguments (Lightning collects both)
        self.train_stream: StreamingFaceDataset | None = None

    def _check_sources(self, train_dir, train_lmdb, val_dir, val_lmdb) -> None:
        train_shards, val_shards = self._shards
        if train_dir is not None or train_lmdb is not None:
            raise ValueError(
                f"data=streaming trains on train_shards={train_shards!r}; train_dir / train_lmdb must be null "
                f"(got {train_dir!r}, {train_lmdb!r}); pack them with codeformer-pack-streaming"
            )
        if train_shards is None:
            raise ValueError(
                "train_shards is not set: a shard folder or URI written by codeformer-pack-streaming"
            )
        if sum(v is not None for v in (val_dir, val_lmdb, val_shards)) > 1:
            raise ValueError("give at most one of val_shards, val_dir and val_lmdb")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._train_source is None:
            source = ShardSource(hp.train_shards, hp.cache_dir, hp.storage_options)
            if hp.latent_codes is not None:
                self._codes = read_latent_codes(hp.latent_codes)
            elif source.has_codes:
                self._codes = source.packed_codes()
            if hp.val_shards is not None:
                val_source = ShardSource(hp.val_shards, hp.cache_dir, hp.storage_options)
                self.val_set = self._dataset(val_source, None, fixed=True)
            elif hp.val_dir is not None or hp.val_lmdb is not None:
                self.val_set = self._dataset(self._source(hp.val_dir, hp.val_lmdb), None, fixed=True)
            self._train_source, self._train_idx = source, list(range(len(source)))
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(self._train_source, None, fixed=False)
            self.train_stream = StreamingFaceDataset(
                self.train_set,
                seed=int(hp.seed),
                shuffle=bool(hp.shuffle),
                cache_dir=hp.cache_dir,
                max_cache_size=hp.max_cache_size,
                storage_options=hp.storage_options,
                max_pre_download=int(hp.max_pre_download),
            )
            self._attach_callback()  # the epoch reaches train_set, skipped records are reported

    def train_dataloader(self) -> StreamingFaceLoader:
        """This rank's share of every epoch, in litdata's order, resumable mid-epoch from a checkpoint."""
        if self.train_stream is None:
            self.setup("fit")
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else self.train_set.epoch
        options = self._loader_options()
        loader = StreamingFaceLoader(
            self.train_stream,
            int(self.hparams.batch_size),
            position=self._position if trainer is not None else None,
            epoch=epoch,
            num_workers=options["num_workers"],
            pin_memory=options["pin_memory"],
        )
        world = loader.dataset.distributed_env.world_size
        if len(loader) == 0:
            raise ValueError(
                f"{len(self.train_set)} training faces give no full batch of {self.hparams.batch_size} on each of "
                f"{world} ranks x {max(options['num_workers'], 1)} loader workers: lower data.batch_size or data.num_workers"
            )
        return loader

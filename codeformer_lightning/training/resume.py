"""Exact resumption: every rank's random state in checkpoints, validation that leaves it untouched,
and ``ckpt_path=auto`` (the newest *valid* checkpoint of a run folder).

What else a resumed run needs comes back through standard hooks: weights, EMA, codebook upkeep
buffers (registered buffers of the stage modules), optimisers, schedulers and the GradScaler
(Lightning), the loop counters (Lightning's fit loop), the data order and position
(:class:`~codeformer_lightning.data.sampling.ResumableLoader`), the non-finite step counters (the
stage modules' ``on_save_checkpoint``).
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

log = logging.getLogger(__name__)

#: what a checkpoint must hold to resume training (Lightning writes these keys)
_TRAINING_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")


# ----------------------------------------------------------------------------- random states
def _plain_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """Fabric's RNG state dict with the numpy key array as a tensor: loadable with weights_only=True."""
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, cached = out["numpy"]
        out["numpy"] = (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                        float(cached))  # fmt: skip
    version, state, gauss = out["python"]
    out["python"] = (int(version), tuple(int(s) for s in state), gauss)
    out["torch.cuda"] = list(out.get("torch.cuda", []))
    return out


def _native_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, cached = out["numpy"]
        out["numpy"] = (name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached)
    if not torch.cuda.is_available():
        out.pop("torch.cuda", None)
    return out


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-element list without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RandomStateCheckpoint(pl.Callback):
    """Carries the training step's random stream (Python, NumPy, torch, CUDA) from one batch to the
    next, saves it for every rank in each checkpoint and restores it on resume.

    The states are taken at the end of each training batch and put back at the start of the next
    one, in every run. So whatever happens between two training steps (validation and its loader,
    epoch ends, loading in the main process, logging) never moves the stream the training steps draw
    from, and it does not matter that a resumed run skips the validation the original run made right
    after the checkpoint. (Randomness drawn between steps reuses values the next step will draw
    again; datasets here draw from their own per-sample generators.) All ranks' states are gathered
    into the checkpoint; resuming with a different number of ranks warns and gives rank ``r`` the
    saved state of rank ``r mod saved ranks``.
    """

    def __init__(self) -> None:
        self._between_steps: dict[str, Any] | None = None  # the stream as the last training batch left it
        self._pending: list[dict[str, Any]] | None = None  # every rank's, from the checkpoint resumed

    def state_dict(self) -> dict[str, Any]:
        # all ranks build every checkpoint (only rank 0 writes it): gather everyone's state
        own = self._between_steps or _collect_rng_states(include_cuda=True)
        return {"ranks": _gather(_plain_rng_states(own))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict["ranks"])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            states, self._pending = self._pending, None
            rank = trainer.global_rank
            if len(states) != trainer.world_size:
                warnings.warn(
                    f"the checkpoint holds the random states of {len(states)} ranks, this run has "
                    f"{trainer.world_size}: rank {rank} continues from saved rank {rank % len(states)}'s state "
                    "(not an exact continuation)",
                    stacklevel=2,
                )
            self._between_steps = _native_rng_states(states[rank % len(states)])
        if self._between_steps is not None:
            _set_rng_states(self._between_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._between_steps = _collect_rng_states(include_cuda=True)


# ----------------------------------------------------------------------------- ckpt_path=auto
def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot resume training (truncated, corrupt, not a training checkpoint), or None.

    Reads the whole file once (CRC of every archive member) without holding it in memory, then
    loads its structure with ``weights_only=True`` (tensors memory-mapped, not read).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"not a complete checkpoint file ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"corrupt data in {bad}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure means Lightning could not load it either
        return f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a Lightning checkpoint"
    missing = [k for k in _TRAINING_KEYS if k not in ckpt]
    if missing:
        return f"not a training checkpoint (no {', '.join(missing)}: weights only?)"
    return None


def checkpoint_candidates(folder: str | Path) -> list[Path]:
    """``*.ckpt`` files of ``folder`` and ``folder/checkpoints``, newest (modification time) first."""
    folder = Path(folder)
    found = {
        p for d in (folder, folder / "checkpoints") if d.is_dir() for p in d.glob("*.ckpt") if p.is_file()
    }
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint under ``folder`` (see :func:`checkpoint_candidates`) that can resume
    training; invalid newer files are skipped with a warning naming them. None when there is none."""
    for path in checkpoint_candidates(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"ckpt_path=auto: skipping {path}: {problem}", stacklevel=2)
    return None


def resolve_ckpt_path(value: str | None, run_dir: str | Path) -> str | None:
    """``ckpt_path`` as given in the config -> what ``Trainer.fit`` receives.

    * ``auto``: the newest valid checkpoint of ``run_dir`` (this run's folder: fix it with
      ``hydra.run.dir=...`` so that a restarted command finds it), or None (start at step 0);
    * ``auto:<folder>``: the same in ``<folder>`` (e.g. a previous run's folder; it must exist);
    * anything else passes through unchanged (a file path, or Lightning's ``last`` / ``hpc`` ...).
    """
    if value is None or not str(value).startswith("auto"):
        return value
    text = str(value)
    if text != "auto" and not text.startswith("auto:"):
        return value
    folder = Path(text[len("auto:") :]) if text.startswith("auto:") else Path(run_dir)
    if text.startswith("auto:") and not folder.is_dir():
        raise FileNotFoundError(
            f"ckpt_path={text}: no such folder (auto:<folder> names a previous run's folder)"
        )
    found = find_resume_checkpoint(folder)
    if found is None:
        log.info("ckpt_path=%s: no valid checkpoint in %s, training starts at step 0", text, folder)
        return None
    log.info("ckpt_path=%s: resuming from %s", text, found)
    return str(found)

"""Restore the requests of one server batch together: faces from several requests share network calls.

The server hands :meth:`BatchRestorer.restore` the requests that arrived within its batch window.
Each photo is detected and aligned on its own (:meth:`FaceRestorer.prepare`); then the face crops
of all requests that ask for the same fidelity weights go through the network together,
``batch_size`` faces per call (:meth:`FaceRestorer.complete`), and are pasted back per request
at the request's own output scale. Requests with different ``w`` lists are restored in separate
groups: pooling them would run every face at every weight of the batch. The restorer applies the
published inference of its weights' task; a request the task cannot take (a whole photo for
inpainting) is answered 400 with the reason. The network calls actually made are observed with a
forward pre-hook and recorded in :class:`BatchStats`, which lives in shared memory so that the
HTTP processes can report what the inference workers did.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass

from codeformer_lightning.inference.restorer import FaceRestorer, RestoreResult
from codeformer_lightning.inference.tasks import TaskError
from codeformer_lightning.serve.protocol import RestoreRequest

log = logging.getLogger("codeformer_lightning.serve")


@dataclass
class Rejection:
    """A request answered with an error instead of an image: HTTP ``status`` and ``detail``."""

    status: int
    detail: str


@dataclass
class Restored:
    """A restored request with what its batch looked like (``batch``: a JSON-ready dict)."""

    request: RestoreRequest
    result: RestoreResult
    batch: dict


class BatchStats:
    """Counters shared between processes: server batches by number of requests and network calls
    by number of faces, totals, and seconds spent per stage of a batch (:data:`STAGES`). Create it
    before the worker processes start."""

    _TOTALS = ("batches", "requests", "rejected", "faces", "network_calls")
    STAGES = ("decode", "restore", "encode")

    def __init__(self, max_requests: int, max_faces: int, context=None) -> None:
        ctx = context or multiprocessing.get_context("spawn")
        self._requests = ctx.Array("q", max_requests + 1)  # histogram over requests per batch
        self._calls = ctx.Array("q", max_faces + 1)  # histogram over faces per network call
        self._totals = ctx.Array("q", len(self._TOTALS))
        self._seconds = ctx.Array("d", len(self.STAGES), lock=False)  # guarded by the totals' lock

    def record(self, requests: int, rejected: int, faces: int, calls: Sequence[int]) -> None:
        with self._totals.get_lock():
            self._requests[min(requests, len(self._requests) - 1)] += 1
            for size in calls:
                self._calls[min(size, len(self._calls) - 1)] += 1
            for i, value in enumerate((1, requests, rejected, faces, len(calls))):
                self._totals[i] += value

    def add_seconds(self, stage: str, seconds: float) -> None:
        with self._totals.get_lock():
            self._seconds[self.STAGES.index(stage)] += seconds

    def snapshot(self) -> dict:
        """``{"batches", "requests", "rejected", "faces", "network_calls", "requests_per_batch":
        {size: count}, "faces_per_network_call": {size: count}, "seconds": {stage: s}}`` (sizes
        as strings: JSON keys)."""
        with self._totals.get_lock():
            totals = dict(zip(self._TOTALS, self._totals[:]))
            per_batch = {str(n): c for n, c in enumerate(self._requests[:]) if c}
            per_call = {str(n): c for n, c in enumerate(self._calls[:]) if c}
            seconds = {stage: round(value, 6) for stage, value in zip(self.STAGES, self._seconds[:])}
        return {**totals, "requests_per_batch": per_batch, "faces_per_network_call": per_call, "seconds": seconds}


class BatchRestorer:
    """Restores lists of :class:`RestoreRequest` with one :class:`FaceRestorer`, pooling faces.

    ``restorer.batch_size`` is the number of faces per network call. Per-request options
    (``upscale``, ``only_center_face``) are passed to :meth:`FaceRestorer.prepare`, so requests
    that differ only in them share network calls.
    """

    def __init__(self, restorer: FaceRestorer, stats: BatchStats | None = None) -> None:
        self.restorer = restorer
        self.stats = stats
        self._calls: list[int] = []
        restorer.model.register_forward_pre_hook(self._count_call)

    def _count_call(self, module, args) -> None:
        self._calls.append(int(args[0].shape[0]))

    def _prepare(self, request: RestoreRequest) -> RestoreResult:
        result = self.restorer.prepare(request.image, request.ws, aligned=request.aligned, upscale=request.upscale,
                                       only_center_face=request.only_center_face)
        # what differs from the task's published inference, or happens to whole photos (said per answer)
        result.notes += self.restorer.task_notes(request.ws, request.aligned)
        return result

    def restore(self, items: Sequence[RestoreRequest | Rejection]) -> list[Restored | Rejection]:
        """One outcome per item, in order. Rejections pass through; a request whose detection or
        restoration fails becomes a 500 :class:`Rejection` without failing the others."""
        start = time.perf_counter()
        outcomes: list[Restored | Rejection | None] = [item if isinstance(item, Rejection) else None for item in items]
        prepared: dict[int, RestoreResult] = {}
        for i, item in enumerate(items):
            if outcomes[i] is None:
                try:
                    prepared[i] = self._prepare(item)
                except TaskError as exc:  # input this task cannot take: the client can fix it
                    outcomes[i] = Rejection(400, str(exc))
                except Exception as exc:  # one bad photo must not take its batch down
                    log.exception("face detection failed for %s", item.origin)
                    outcomes[i] = Rejection(500, f"face detection failed: {exc}")
        groups: dict[tuple, list[int]] = {}
        for i, result in prepared.items():
            groups.setdefault(tuple(result.ws), []).append(i)
        all_calls: list[int] = []
        for members in groups.values():
            self._calls.clear()
            try:
                self.restorer.complete([items[i].image for i in members], [prepared[i] for i in members])
            except Exception as exc:
                log.exception("restoration failed for a group of %d request(s)", len(members))
                for i in members:
                    outcomes[i] = Rejection(500, f"restoration failed: {exc}")
                continue
            calls = list(self._calls)
            all_calls += calls
            faces = sum(len(prepared[i].cropped_faces) for i in members)
            for i in members:
                info = {"requests": len(items), "group_requests": len(members), "group_faces": faces,
                        "network_calls": calls}
                outcomes[i] = Restored(items[i], prepared[i], info)
        self._record(outcomes, all_calls, time.perf_counter() - start)
        return outcomes

    def _record(self, outcomes: list, calls: list[int], seconds: float) -> None:
        rejected = sum(isinstance(o, Rejection) for o in outcomes)
        faces = sum(len(o.result.cropped_faces) for o in outcomes if isinstance(o, Restored))
        log.info("batch of %d request(s) (%d rejected): %d face(s) in network calls of %s faces, %.0f ms",
                 len(outcomes), rejected, faces, calls or "no", seconds * 1000)
        if self.stats is not None:
            self.stats.record(len(outcomes), rejected, faces, calls)
            self.stats.add_seconds("restore", seconds)

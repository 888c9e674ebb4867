"""``codeformer-serve --weights W``: an HTTP face-restoration API on LitServe with dynamic batching.

Endpoints:

* ``POST /restore``: a photo in (multipart or base64 JSON, see :mod:`.protocol`), the restored
  image(s), face count and boxes out as JSON;
* ``GET /health``: 200 ``ok`` once every inference worker has loaded its network (LitServe's);
* ``GET /stats``: server batches by request count, network calls by face count, in-flight requests.

Requests that arrive within ``--batch-timeout`` seconds of each other (up to ``--max-batch-size``)
form one server batch; :class:`.batching.BatchRestorer` detects faces per photo, runs the faces
of all its requests through the network together (``--face-batch-size`` per call) and pastes
them back per request. Bad input is answered per request with a 4xx and a message, and never
fails the other requests of its batch.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
import torch
from fastapi.responses import JSONResponse

from codeformer_lightning.inference.tasks import TASKS
from codeformer_lightning.serve.batching import BatchRestorer, BatchStats, Rejection, Restored
from codeformer_lightning.serve.gate import RequestGate
from codeformer_lightning.serve.protocol import (
    Limits,
    RequestError,
    RestoreRequest,
    parse_fields,
    response_body,
)

API_PATH = "/restore"
log = logging.getLogger("codeformer_lightning.serve")


DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_TIMEOUT = 0.02


@dataclass(frozen=True)
class RestorerSettings:
    """How each inference worker builds its :class:`FaceRestorer` (the device comes from LitServe).
    ``threads``: torch CPU threads (None: torch's default); ``cpu_threads``: threads that decode
    uploads and encode answers in parallel (PIL and OpenCV release the GIL); ``task``: the published
    inference to apply (None: the weights' variant, see :mod:`codeformer_lightning.inference.tasks`)."""

    weights: str
    precision: str = "fp32"
    face_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    detector: str = "mtcnn"
    detector_weights: str | None = None
    threads: int | None = None
    cpu_threads: int = 4
    task: str | None = None


class RestorationAPI(ls.LitAPI):
    """LitServe steps: ``setup`` loads the network once per worker; ``decode_request`` checks one
    request's fields (a :class:`Rejection` instead of raising, so that a bad request cannot fail
    its batch); ``predict`` decodes the batch's images in parallel, restores them together and
    builds the answers in parallel; ``encode_response`` hands over the JSON or the error."""

    def __init__(self, settings: RestorerSettings, limits: Limits, stats: BatchStats | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_timeout: float = DEFAULT_BATCH_TIMEOUT) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.settings = settings
        self.limits = limits
        self.stats = stats
        self.batcher: BatchRestorer | None = None
        self.pool: ThreadPoolExecutor | None = None

    def setup(self, device: str) -> None:
        from codeformer_lightning.inference.restorer import FaceRestorer

        _log_to_stderr()
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        restorer = FaceRestorer(s.weights, detector=s.detector, device=device, precision=s.precision,
                                batch_size=s.face_batch_size, detector_weights=s.detector_weights, task=s.task)
        if restorer.task.whole_photos:
            _ = restorer.detector  # built now: a missing detector file stops start-up, not the first photo
        self.batcher = BatchRestorer(restorer, self.stats)
        self.pool = ThreadPoolExecutor(s.cpu_threads, thread_name_prefix="codec")
        log.info("worker ready on %s: %s (%s), %s, %d faces per network call, %d codec threads", device, s.weights,
                 restorer.task.describe(), s.precision, s.face_batch_size, s.cpu_threads)

    def decode_request(self, request):
        try:
            return parse_fields(request, self.limits)
        except RequestError as exc:
            return Rejection(exc.status, exc.detail)

    def _decode(self, item: RestoreRequest | Rejection) -> RestoreRequest | Rejection:
        if isinstance(item, Rejection):
            return item
        try:
            return item.decode(self.limits.max_pixels)
        except RequestError as exc:
            return Rejection(exc.status, exc.detail)

    @staticmethod
    def _answer(outcome: Restored | Rejection) -> dict | JSONResponse:
        if isinstance(outcome, Rejection):
            return JSONResponse({"detail": outcome.detail}, status_code=outcome.status)
        return response_body(outcome.request, outcome.result, outcome.batch)

    def predict(self, x):
        # LitServe passes a list when batching (max_batch_size > 1) and a single item otherwise
        items = x if isinstance(x, list) else [x]
        start = time.perf_counter()
        decoded = list(self.pool.map(self._decode, items))
        decoded_at = time.perf_counter()
        outcomes = self.batcher.restore(decoded)
        restored_at = time.perf_counter()
        answers = list(self.pool.map(self._answer, outcomes))
        if self.stats is not None:
            self.stats.add_seconds("decode", decoded_at - start)
            self.stats.add_seconds("encode", time.perf_counter() - restored_at)
        return answers if isinstance(x, list) else answers[0]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output  # built in predict, in parallel


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s[%(process)d] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_server(args: argparse.Namespace) -> ls.LitServer:
    """A :class:`litserve.LitServer` from parsed ``codeformer-serve`` arguments (not started)."""
    stats = BatchStats(args.max_batch_size, args.face_batch_size or args.max_batch_size)
    settings = RestorerSettings(str(args.weights), args.precision, args.face_batch_size or args.max_batch_size,
                                args.detector, str(args.detector_weights) if args.detector_weights else None,
                                args.threads, args.cpu_threads, args.task)
    limits = Limits(args.max_pixels, args.max_upscale, args.max_fidelities)
    api = RestorationAPI(settings, limits, stats, args.max_batch_size, args.batch_timeout)
    in_flight = multiprocessing.get_context("fork").Value("i", 0)  # shared by the forked HTTP processes
    gate = (RequestGate, {"path": API_PATH, "max_bytes": args.max_request_bytes,
                          "max_in_flight": args.max_in_flight, "in_flight": in_flight})
    server = ls.LitServer(api, accelerator=args.accelerator, devices=args.devices,
                          workers_per_device=args.workers, timeout=args.timeout, middlewares=[gate])
    # answers are base64 of PNG/JPEG bytes, already compressed: LitServe's gzip (level 9) would spend
    # CPU per answer to win back little more than base64's one-third overhead
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls.__name__ != "GZipMiddleware"]

    async def stats_endpoint() -> JSONResponse:
        return JSONResponse({**stats.snapshot(), "in_flight": in_flight.value,
                             "max_batch_size": args.max_batch_size,
                             "face_batch_size": settings.face_batch_size})

    server.app.add_api_route("/stats", stats_endpoint, methods=["GET"])
    return server


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeformer-serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, type=Path, help="CodeFormer weights (.pth or .safetensors)")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"))
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--devices", default="auto", help="number of devices, or 'auto'")
    p.add_argument("--workers", type=_positive(int), default=1, help="inference workers per device")
    p.add_argument("--api-servers", type=_positive(int), default=None,
                   help="HTTP server processes (default: one per inference worker)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads per worker")
    p.add_argument("--cpu-threads", type=_positive(int), default=min(4, os.cpu_count() or 1),
                   help="threads per worker that decode uploads and encode answers")
    p.add_argument("--max-batch-size", type=_positive(int), default=DEFAULT_MAX_BATCH_SIZE,
                   help="requests per server batch")
    p.add_argument("--batch-timeout", type=float, default=DEFAULT_BATCH_TIMEOUT,
                   help="seconds a batch waits for more requests")
    p.add_argument("--face-batch-size", type=_positive(int), default=None,
                   help="faces per network call (default: --max-batch-size)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="published inference to apply (default: the weights' variant): restoration, "
                   "colorization (w=0) or inpainting (w=1, aligned faces only, white pixels filled)")
    p.add_argument("--detector", choices=("mtcnn", "retinaface"), default="mtcnn")
    p.add_argument("--detector-weights", type=Path, default=None)
    p.add_argument("--max-request-bytes", type=_positive(int), default=20 * 2**20)
    p.add_argument("--max-pixels", type=_positive(int), default=Limits.max_pixels,
                   help="largest input image, width x height")
    p.add_argument("--max-upscale", type=_positive(float), default=Limits.max_upscale)
    p.add_argument("--max-fidelities", type=_positive(int), default=Limits.max_fidelities,
                   help="most w values in one request")
    p.add_argument("--max-in-flight", type=_positive(int), default=64,
                   help="requests served at once; more get 503")
    p.add_argument("--timeout", type=_positive(float), default=60.0,
                   help="seconds a request may wait in the queue before a 504")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from codeformer_lightning.checkpoints import CheckpointError, inspect_checkpoint

    if args.devices != "auto":
        if not args.devices.isdigit() or int(args.devices) < 1:
            parser.error(f"--devices must be a positive number or 'auto', got {args.devices!r}")
        args.devices = int(args.devices)
    if args.batch_timeout < 0:
        parser.error(f"--batch-timeout must be >= 0, got {args.batch_timeout}")
    if args.batch_timeout >= args.timeout:
        parser.error(f"--batch-timeout ({args.batch_timeout}) must be shorter than --timeout ({args.timeout})")
    if args.precision == "fp16" and args.accelerator == "cpu":
        parser.error("--precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    try:
        kind = inspect_checkpoint(args.weights).kind
    except CheckpointError as exc:
        parser.error(f"--weights {args.weights}: {exc}")
    if kind != "CodeFormer":
        parser.error(f"--weights {args.weights} holds a {kind}, not a CodeFormer restoration network")


def _stop_on_sigterm() -> None:
    """SIGTERM (``docker stop``, ``kill``) to the main process shuts down like Ctrl-C: LitServe then
    stops its HTTP and worker processes and ``run`` returns. The HTTP processes fork from this one
    and inherit the handler: there it keeps SIGTERM's default meaning (LitServe terminates them)."""
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    server = build_server(args)
    _stop_on_sigterm()
    try:
        server.run(host=args.host, port=args.port, num_api_servers=args.api_servers, log_level=args.log_level,
                   generate_client_file=False)
    except RuntimeError as exc:  # a worker failed to load; its traceback is in the log above
        print(f"codeformer-serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the server was up: stop the workers already started
        for worker in getattr(server, "inference_workers", []):
            worker.terminate()
            worker.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

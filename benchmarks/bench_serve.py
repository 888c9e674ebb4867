"""Load test of ``codeformer-serve`` on localhost: throughput and latency at several client counts.

    python benchmarks/bench_serve.py                     # tiny random network, aligned 512 px faces
    python benchmarks/bench_serve.py --whole             # whole photos: detection + paste-back per request
    python benchmarks/bench_serve.py --weights codeformer.pth --accelerator cuda --threads 0

Baseline, measured in the same run and process conditions: sequential, unbatched ``FaceRestorer``
calls in this process (decode the uploaded bytes, restore, encode PNG: the server's work without
HTTP and batching). Then a server with batching (``--max-batch-size``) and, for reference, the
same server with ``--max-batch-size 1`` are loaded by 1, 4 and 16 concurrent clients (threads,
keep-alive connections), each run bounded by ``--requests`` and ``--seconds``; all setups are measured in ``--rounds``
interleaved rounds and the medians reported. Reported: requests
per second, p50/p95 latency, the mean number of requests per server batch and faces per network
call (from ``/stats``), and throughput as a ratio to the baseline. Clients, HTTP process and
inference worker share this machine's cores: on a small or loaded machine the ratios, not the
absolute numbers, are the result.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from codeformer_lightning.checkpoints import save_weights
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import decode_image, encode_image, read_image
from codeformer_lightning.nn import CodeFormer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "faces"
#: the test suite's 32 px network (tests/conftest.py TINY_CF)
TINY = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,), codebook_size=64,
            emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))


def request_images(whole: bool, count: int) -> tuple[list[bytes], str]:
    """Encoded request bodies' images: shared real faces/photos, else scikit-image's astronaut."""
    folder = SHARED / ("whole" if whole else "aligned")
    paths = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")) if folder.is_dir() else []
    if whole:
        paths = [p for p in paths if p.suffix == ".jpg"]  # the small photos: detection dominates less
    if paths:
        images = [read_image(p) for p in paths]
        source = f"{folder.resolve()} ({len(paths)} files)"
    else:
        from skimage import data

        images, source = [data.astronaut()], "scikit-image astronaut"
    return [encode_image(images[i % len(images)], "png") for i in range(count)], source


def baseline(restorer: FaceRestorer, bodies: list[bytes], aligned: bool, seconds: float) -> dict:
    """Sequential, one request at a time, no batching, no HTTP."""
    latencies, start = [], time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        result = restorer.restore(decode_image(body), w=0.5, aligned=aligned)
        encode_image(result.image, "png")
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - start > seconds:
            break
    return summary(latencies, time.perf_counter() - start)


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95))}


class Server:
    def __init__(self, weights: Path, args, max_batch_size: int) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "codeformer_lightning.serve.api", "--weights", str(weights),
                   "--port", str(self.port), "--accelerator", args.accelerator,
                   "--max-batch-size", str(max_batch_size), "--batch-timeout", str(args.batch_timeout),
                   "--max-in-flight", "256", "--log-level", "warning"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.cpu_threads:
            command += ["--cpu-threads", str(args.cpu_threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.process.stderr.read()[-3000:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=30).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


def load(server: Server, bodies: list[bytes], clients: int, aligned: bool, seconds: float) -> dict:
    """``clients`` threads send the bodies (each one once, shared queue) until done or ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(len(bodies)))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                with lock:
                    index = next(todo, None)
                if index is None:
                    return
                t0 = time.perf_counter()
                answer = http.post(f"{server.url}/restore", files={"image": ("face.png", bodies[index])},
                                   data={"w": "0.5", "aligned": str(aligned).lower()})
                took = time.perf_counter() - t0
                with lock:
                    (latencies.append(took) if answer.status_code == 200 else errors.append(answer.text[:200]))

    before = server.stats()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    after = server.stats()
    if errors:
        print(f"   {len(errors)} failed requests, e.g. {errors[0]}")
    result = summary(latencies, wall)
    batches = after["batches"] - before["batches"]
    calls = after["network_calls"] - before["network_calls"]
    result["per_batch"] = (after["requests"] - before["requests"]) / max(batches, 1)
    result["per_call"] = (after["faces"] - before["faces"]) / max(calls, 1)
    served = max(after["requests"] - before["requests"], 1)
    for stage, seconds in after["seconds"].items():  # worker time per request, by stage
        result[f"{stage}_ms"] = (seconds - before["seconds"][stage]) / served * 1000
    return result


def network_ms_per_face(restorer: FaceRestorer, batch_size: int, faces: int = 32) -> float:
    """The network alone, ``faces`` aligned crops in calls of ``batch_size``: the most batching can save."""
    crops = [np.random.default_rng(i).integers(0, 256, (restorer.face_size,) * 2 + (3,), np.uint8)
             for i in range(faces)]
    restorer.batch_size = batch_size
    restorer.restore_faces(crops[:batch_size], [0.5])  # warm-up
    start = time.perf_counter()
    restorer.restore_faces(crops, [0.5])
    restorer.batch_size = 1
    return (time.perf_counter() - start) / faces * 1000


def median_row(runs: list[dict]) -> dict:
    """Per-key median over the rounds (robust to a neighbour's job starting in one of them)."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def measure(args, weights: Path, bodies: list[bytes], aligned: bool) -> list[tuple[str, int, dict]]:
    """All setups, interleaved round by round: drifting machine load hits every setup alike."""
    restorer = FaceRestorer(weights, batch_size=1, device="cuda" if args.accelerator == "cuda" else "cpu")
    baseline(restorer, bodies[:3], aligned, args.seconds)  # warm-up (detector, allocator)
    configs = [(f"codeformer-serve --max-batch-size {args.max_batch_size}", args.max_batch_size)]
    if not args.no_unbatched:
        configs.append(("codeformer-serve --max-batch-size 1", 1))
    servers = []
    try:
        for name, batch in configs:
            servers.append((name, Server(weights, args, batch)))
            load(servers[-1][1], bodies[:4], 2, aligned, args.seconds)  # warm-up
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            runs.setdefault(("FaceRestorer, sequential, unbatched (baseline)", 1), []).append(
                baseline(restorer, bodies, aligned, args.seconds))
            for clients in args.clients:
                for name, server in servers:
                    runs.setdefault((name, clients), []).append(load(server, bodies, clients, aligned, args.seconds))
    finally:
        for _, server in servers:
            server.stop()
    return [(name, clients, median_row(results)) for (name, clients), results in runs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: the tiny random 32 px network")
    parser.add_argument("--whole", action="store_true", help="whole photos instead of aligned faces")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="most requests per measurement")
    parser.add_argument("--seconds", type=float, default=20.0, help="most seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (server and baseline); 0: default")
    parser.add_argument("--cpu-threads", type=int, default=0, help="server codec threads; 0: its default")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-size 1 server")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aligned = not args.whole
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = save_weights(CodeFormer(**TINY).eval(), Path(tmp) / "tiny.safetensors")
        bodies, source = request_images(args.whole, args.requests)
        print(f"requests: {'whole photos' if args.whole else 'aligned faces'} from {source}; network {weights}; "
              f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; "
              f"torch threads {args.threads or 'default'}; {args.rounds} interleaved rounds, medians")
        rows = measure(args, weights, bodies, aligned)
        restorer = FaceRestorer(weights, device="cuda" if args.accelerator == "cuda" else "cpu")
        single, batched = (network_ms_per_face(restorer, n) for n in (1, args.max_batch_size))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"network alone: {single:.1f} ms/face in calls of 1, {batched:.1f} ms/face in calls of "
          f"{args.max_batch_size} ({single / batched:.2f}x)")
    base = rows[0][2]
    print("\n| setup | clients | requests | req/s | p50 ms | p95 ms | requests/batch | faces/network call | "
          "worker ms/request: decode, restore, encode | req/s vs baseline |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, clients, r in rows:
        per_batch = f"{r['per_batch']:.2f}" if "per_batch" in r else "1"
        per_call = f"{r['per_call']:.2f}" if "per_call" in r else "1"
        stages = f"{r['decode_ms']:.0f}, {r['restore_ms']:.0f}, {r['encode_ms']:.0f}" if "decode_ms" in r else "-"
        print(f"| {name} | {clients} | {r['requests']:.0f} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
              f"{per_batch} | {per_call} | {stages} | {r['rps'] / base['rps']:.2f}x |")


if __name__ == "__main__":
    main()

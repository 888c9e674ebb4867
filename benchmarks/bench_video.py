"""Frames per second of video face restoration: one face at a time on the CPU vs batched on a device.

A short synthetic clip: real aligned faces from ../shared/faces/aligned (synthetic textures when
absent) pasted into 640x480 frames at known landmarks, drifting a little from frame to frame. Both
paths get those landmarks (detection is the same work in both and is left out), so what is timed is
align -> network -> paste-back:

(a) baseline, the published way: per face ``warp_face`` (cv2) -> network at batch 1 -> uint8 ->
    ``paste_back`` (cv2) into its frame;
(b) :class:`~codeformer_lightning.deploy.video.BatchedVideoRestorer`: all faces of the clip warped at
    once on the device, restored in batches, pasted back on the device.

The network is a random-weight published-size CodeFormer (weights do not change speed); ``--tiny``
uses the 32 px test network for a quick run; ``--geometry`` replaces the network by the identity (512 px
crops), so that only alignment and paste-back are timed. Runs are interleaved (a, b, a, b) and the best
of ``--repeats`` is kept, so that machine load hits both alike. Both paths run with the same number of
CPU threads, for torch and for cv2 (``--threads``, default 1): on a small shared machine more threads
than free cores make tiny batch-1 network calls wait on each other (a 32 px call measured 1.4 s per face
at 2 threads on 2 loaded cores, 9 ms at 1 thread).

    python benchmarks/bench_video.py --tiny             # seconds
    python benchmarks/bench_video.py --geometry --repeats 5   # align + paste-back only
    python benchmarks/bench_video.py                    # 512 px network, CPU: 4 faces (~2 min on 2 cores)
    python benchmarks/bench_video.py --device cuda --frames 64 --faces-per-frame 2
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from codeformer_lightning.deploy.video import BatchedVideoRestorer
from codeformer_lightning.inference.align import estimate_alignment, face_template, invert_affine, warp_face
from codeformer_lightning.inference.detection import Face
from codeformer_lightning.inference.paste import paste_back
from codeformer_lightning.nn import CodeFormer

ROOT = Path(__file__).resolve().parents[1]
SHARED_FACES = ROOT.parent / "shared" / "faces" / "aligned"
TINY = dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,), codebook_size=64,
            emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2, fusion_resolutions=(8, 16))


def source_faces(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Aligned 512 px faces ``(512, 512, 3)`` uint8 RGB: the shared real ones, else smooth noise."""
    files = sorted(SHARED_FACES.glob("*.png")) if SHARED_FACES.is_dir() else []
    if files:
        return [cv2.cvtColor(cv2.imread(str(files[i % len(files)])), cv2.COLOR_BGR2RGB) for i in range(count)]
    return [cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (512, 512), interpolation=cv2.INTER_CUBIC)
            for _ in range(count)]


def make_clip(frames: int, faces_per_frame: int, width: int, height: int, seed: int = 0
              ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Frames ``(H, W, 3)`` uint8 and the landmarks ``(5, 2)`` of the faces placed in each."""
    rng = np.random.default_rng(seed)
    background = cv2.resize(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), (width, height),
                            interpolation=cv2.INTER_CUBIC)
    faces = source_faces(faces_per_frame, rng)
    template = face_template(512).astype(np.float64)
    clip, marks = [], []
    for n in range(frames):
        frame, frame_marks = background.copy(), []
        for k, face in enumerate(faces):
            # faces ~180 px wide, spread across the frame, drifting and turning slowly
            cx = width * (k + 1) / (faces_per_frame + 1) + 3 * n
            cy = height / 2 + 2 * n
            angle, scale = 0.1 * np.sin(n / 5 + k), 0.45
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            landmarks = (template - template.mean(0)) @ rot.T * scale + (cx, cy)
            inverse = invert_affine(estimate_alignment(landmarks, 512))
            warped = cv2.warpAffine(face, inverse, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
            inside = cv2.warpAffine(np.ones((512, 512), np.uint8), inverse, (width, height)) > 0
            frame[inside] = warped[inside]
            frame_marks.append(landmarks)
        clip.append(frame)
        marks.append(frame_marks)
    return clip, marks


class IdentityNetwork(torch.nn.Module):
    """Stands in for CodeFormer in ``--geometry`` runs: returns its input, ``(B, 3, S, S)`` in [-1, 1]."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        return x


class KnownFaces:
    """A detector that returns the clip's known landmarks, frame after frame."""

    def __init__(self, marks: list[list[np.ndarray]]) -> None:
        self.marks, self.calls = marks, 0

    def detect(self, image: np.ndarray) -> list[Face]:
        found = self.marks[self.calls % len(self.marks)]
        self.calls += 1
        return [Face(np.r_[m.min(0), m.max(0)], m, 1.0) for m in found]


@torch.inference_mode()
def one_at_a_time(model: torch.nn.Module, clip, marks, w: float, times: dict[str, float]) -> list[np.ndarray]:
    """Baseline (a): per face warp_face -> network (batch 1, CPU) -> paste_back."""
    size = model.img_size
    out = []
    for frame, frame_marks in zip(clip, marks):
        result = frame
        for landmarks in frame_marks:
            t0 = time.perf_counter()
            affine = estimate_alignment(landmarks, size)
            crop = warp_face(frame, affine, size)
            t1 = time.perf_counter()
            x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            y = model(x, w=w, adain=True)
            restored = ((y[0] + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()
            t2 = time.perf_counter()
            result = paste_back(result, [restored], [affine])
            t3 = time.perf_counter()
            times["align"] += t1 - t0
            times["network"] += t2 - t1
            times["paste"] += t3 - t2
        out.append(result)
    return out


def batched(restorer: BatchedVideoRestorer, clip, marks, w: float, times: dict[str, float]) -> list[np.ndarray]:
    """Path (b): the batched device restorer, fed the known landmarks."""
    restorer._detector = KnownFaces(marks)
    restorer.timings = defaultdict(float)
    out = restorer.restore_frames(clip, w)
    for stage in ("align", "network", "paste", "upload", "download", "detect"):
        times[stage] += restorer.timings.get(stage, 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2, help="frames in the clip (default 2)")
    parser.add_argument("--faces-per-frame", type=int, default=2, help="faces in each frame (default 2)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=8, help="faces per network call in path (b)")
    parser.add_argument("--device", action="append", default=None,
                        help="device(s) for path (b); repeatable (default: cpu, plus cuda when present)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="path (b) on CUDA")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each path; best kept (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and cv2, both paths (default 1)")
    parser.add_argument("--tiny", action="store_true", help="32 px test network instead of the 512 px one")
    parser.add_argument("--geometry", action="store_true",
                        help="identity network on 512 px crops: time alignment and paste-back only")
    parser.add_argument("-w", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    torch.manual_seed(0)
    if args.geometry:
        model = IdentityNetwork(32 if args.tiny else 512)
    else:
        model = CodeFormer(**TINY).eval() if args.tiny else CodeFormer().eval()
    clip, marks = make_clip(args.frames, args.faces_per_frame, args.width, args.height)
    n_faces = sum(len(m) for m in marks)
    kind = "identity" if args.geometry else ("tiny" if args.tiny else "published size") + ", random weights"
    print(f"clip: {args.frames} frames {args.width}x{args.height}, {n_faces} faces, network "
          f"{model.img_size}px ({kind}), "
          f"CPU threads {torch.get_num_threads()}")

    # on CPU both geometry back ends of path (b): torch grid_sample (the GPU design) and cv2 warps
    runs_b = [(d, g) for d in devices for g in (("torch", "cv2") if d == "cpu" else ("torch",))]
    for device, geometry in runs_b:
        precision = args.precision if device.startswith("cuda") else "fp32"
        restorer = BatchedVideoRestorer(CodeFormer(**TINY) if args.geometry else copy.deepcopy(model), device=device,
                                        batch_size=args.batch_size, chunk_frames=args.frames, precision=precision,
                                        profile=True, geometry=geometry)
        if args.geometry:  # the restorer takes only CodeFormers; swap in the identity afterwards
            restorer.model, restorer.face_size = model.to(device), model.img_size
        cpu_model = model.cpu()
        if args.tiny or args.geometry or device != "cpu":
            # warm-up (allocator, cuDNN autotune, first calls); negligible next to a 512 px pass on a CPU
            one_at_a_time(cpu_model, clip[:1], marks[:1], args.w, defaultdict(float))
            batched(restorer, clip[:1], marks[:1], args.w, defaultdict(float))
        best: dict[str, tuple[float, dict]] = {}
        for _ in range(args.repeats):
            runs = (("a", lambda t, m=cpu_model: one_at_a_time(m, clip, marks, args.w, t)),
                    ("b", lambda t, r=restorer: batched(r, clip, marks, args.w, t)))
            for name, run in runs:
                times: dict[str, float] = defaultdict(float)
                start = time.perf_counter()
                out = run(times)
                elapsed = time.perf_counter() - start
                if name not in best or elapsed < best[name][0]:
                    best[name] = (elapsed, dict(times), out)
        (ta, times_a, out_a), (tb, times_b, out_b) = best["a"], best["b"]
        diff = np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(out_a, out_b)])

        def split(times: dict[str, float]) -> str:
            return ", ".join(f"{k} {1000 * v / n_faces:.1f}" for k, v in times.items() if v > 0)

        print(f"\n[b on {device}, {precision}, batch {args.batch_size}, {geometry} geometry]")
        print(f"  (a) one face at a time, CPU : {args.frames / ta:8.3f} frames/s  ({ta:.2f} s; ms/face: {split(times_a)})")
        print(f"  (b) batched on {device:<12}: {args.frames / tb:8.3f} frames/s  ({tb:.2f} s; ms/face: {split(times_b)})")
        print(f"  speed-up b/a: {ta / tb:.2f}x   align only: {times_a['align'] / max(times_b['align'], 1e-9):.2f}x"
              f"   paste-back only: {times_a['paste'] / max(times_b['paste'], 1e-9):.2f}x"
              f"   mean |a - b| per pixel: {diff:.3f} grey levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

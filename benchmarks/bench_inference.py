"""End-to-end face restoration throughput on whole photos, split into its stages.

    python benchmarks/bench_inference.py                    # shared photos (or skimage's astronaut), CPU and GPU if any
    python benchmarks/bench_inference.py --weights codeformer.pth --devices cuda --batch-size 16

Stages: detection (MTCNN), alignment (landmark fit + warp), restoration (CodeFormer, batched) and
paste-back. A random-weight published-size ``CodeFormer()`` is used by default: weights do not change
speed. The published network costs tens of seconds per face on a small CPU, so on CPU only
``--cpu-faces`` faces go through it and the restoration time for all faces is extrapolated (marked
"est."). Baselines measured in the same run: MTCNN with one torch thread vs. all threads (CPU);
batch 1 vs. ``--batch-size`` and fp32 vs. bf16 restoration (GPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from codeformer_lightning.inference.align import estimate_alignment, warp_face
from codeformer_lightning.inference.detection import MTCNNDetector
from codeformer_lightning.inference.paste import paste_back
from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.io import IMAGE_EXTENSIONS, read_image
from codeformer_lightning.nn import CodeFormer

DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / ".." / "shared" / "faces" / "whole"


def load_photos(folder: Path | None) -> tuple[list[np.ndarray], str]:
    if folder is not None and folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if paths:
            return [read_image(p) for p in paths], str(folder.resolve())
    from skimage import data  # bundled real photographs, no download

    astronaut = data.astronaut()
    group = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    return [astronaut, group], "synthetic (skimage astronaut, single and mirrored pair)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Best-of-``repeats`` seconds of ``fn()`` and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def restore_seconds(restorer: FaceRestorer, crops: list[np.ndarray], w: float, repeats: int = 1) -> float:
    restorer.restore_faces(crops[: restorer.batch_size], [w])  # warm-up (cudnn autotune, allocator)
    seconds, _ = timed(lambda: restorer.restore_faces(crops, [w]), restorer.device, repeats)
    return seconds


def run_device(device: torch.device, photos: list[np.ndarray], model: CodeFormer, args) -> None:
    print(f"\n=== {device} ===")
    detector = MTCNNDetector(device=device)
    detector.detect(photos[0])  # warm-up
    det_s, detections = timed(lambda: [detector.detect(p) for p in photos], device, args.repeats)
    faces_per_photo = [len(d) for d in detections]
    n_faces = sum(faces_per_photo)
    print(f"photos {len(photos)}, faces {n_faces} {faces_per_photo}")
    if n_faces == 0:
        print("no faces found: nothing to restore")
        return
    face_size = model.config["img_size"]

    def align():
        affines = [[estimate_alignment(f.landmarks, face_size) for f in d] for d in detections]
        crops = [[warp_face(p, m, face_size) for m in ms] for p, ms in zip(photos, affines)]
        return affines, crops

    align_s, (affines, crops) = timed(align, device, args.repeats)
    all_crops = [c for cs in crops for c in cs]
    paste_s, _ = timed(lambda: [paste_back(p, cs, ms) for p, cs, ms in zip(photos, crops, affines)],
                       device, args.repeats)

    restorer = FaceRestorer(model, device=device, batch_size=args.batch_size)
    cpu_faces = args.cpu_faces or (n_faces if face_size <= 64 else 1)
    if device.type == "cpu" and cpu_faces < n_faces:
        subset = all_crops[:cpu_faces]
        restore_s = restore_seconds(restorer, subset, args.w) * n_faces / len(subset)
        note = f" (est. from {len(subset)} face(s))"
    else:
        restore_s = restore_seconds(restorer, all_crops, args.w, args.repeats)
        note = ""
    total = det_s + align_s + restore_s + paste_s
    print(f"{'stage':<12}{'seconds':>10}{'share':>8}{'ms/face':>10}")
    for name, sec in [("detection", det_s), ("alignment", align_s), ("restoration", restore_s), ("paste-back", paste_s)]:
        print(f"{name:<12}{sec:>10.3f}{sec / total:>8.1%}{1000 * sec / n_faces:>10.1f}" + (note if name == "restoration" else ""))
    print(f"end to end: {n_faces / total:.2f} faces/s ({total:.2f} s for {n_faces} faces, batch {args.batch_size})")

    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one_s, _ = timed(lambda: [detector.detect(p) for p in photos], device, args.repeats)
        torch.set_num_threads(threads)
        print(f"baseline: MTCNN with 1 torch thread {one_s:.3f} s vs {threads} threads {det_s:.3f} s "
              f"-> {threads}-thread speed-up x{one_s / det_s:.2f}")
    else:
        single = FaceRestorer(model, device=device, batch_size=1)
        one_s = restore_seconds(single, all_crops, args.w)
        print(f"baseline: restoration batch 1 {one_s:.3f} s vs batch {args.batch_size} {restore_s:.3f} s "
              f"-> speed-up x{one_s / restore_s:.2f}")
        bf16 = FaceRestorer(model, device=device, batch_size=args.batch_size, precision="bf16")
        bf_s = restore_seconds(bf16, all_crops, args.w)
        print(f"bf16 autocast restoration {bf_s:.3f} s vs fp32 {restore_s:.3f} s -> speed-up x{restore_s / bf_s:.2f}")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="folder of whole photos")
    parser.add_argument("--weights", type=Path, default=None, help="CodeFormer weights (default: random init)")
    parser.add_argument("--tiny", action="store_true", help="tiny 32-px network instead of the published size")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpu-faces", type=int, default=None,
                        help="faces restored on CPU, the rest extrapolated (default: 1 at 512 px, all for --tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="best-of repeats for the cheap stages")
    parser.add_argument("-w", type=float, default=0.5)
    args = parser.parse_args(argv)

    photos, source = load_photos(args.folder)
    print(f"photos: {source}; sizes {[p.shape[:2] for p in photos]}; torch threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    if args.weights is not None:
        from codeformer_lightning.checkpoints import load_pretrained

        model = load_pretrained(args.weights)
    elif args.tiny:
        model = CodeFormer(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_resolutions=(4,),
                           codebook_size=64, emb_dim=32, norm_groups=8, dim_embd=64, n_head=4, n_layers=2,
                           fusion_resolutions=(8, 16))
    else:
        model = CodeFormer()
    print(f"network: {'weights ' + str(args.weights) if args.weights else 'random init'}, "
          f"img_size {model.config['img_size']}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for name in devices:
        run_device(torch.device(name), photos, model.eval(), args)


if __name__ == "__main__":
    main()

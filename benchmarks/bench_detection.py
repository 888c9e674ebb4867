"""MTCNN face detection: speed against the published-style cascade and the wave-1 default, and
false positives / recall of the landmark check.

    python benchmarks/bench_detection.py                 # both parts
    python benchmarks/bench_detection.py --speed         # timing and agreement only
    python benchmarks/bench_detection.py --quality       # false positives and recall only
    python benchmarks/bench_detection.py --profile       # where the default detector's time goes
    python benchmarks/bench_detection.py --sensitivity   # agreement when fewer candidates are refined

Speed. Baseline: ``tests/inference/mtcnn_reference.py``, the cascade computed the published way (one
P-Net call per pyramid level with a host round trip each, NCHW layers, one crop copy per box), with
the same weights, and the same cascade on channels-last tensors: the library's default detector
as issue 16 found it (wave 1; 1.6x faster than NCHW). All run on the same photos (``shared/faces/whole``, else skimage's astronaut) in
the same process, interleaved, so machine load hits both alike; the ratio of medians is printed with
the agreement of the detections (matched IoU, landmark distance in pixels). Rows: our cascade on the
full pyramid with the landmark check off (the baseline's computation), on the full pyramid
(``skip_faces_below=0``, the default before 2026-11-30), and the default detector (pyramid from
24 px faces on). ``--threads`` sets torch's thread count, which the detector also uses for its cv2
resizing.

Quality. Detections before (``check_landmarks=False``) and after (default) the landmark check on:
the shared whole photos with their hand-labelled faces (``tests/inference/whole_photo_faces.json``),
the same photos turned, flipped and scaled, the same photos with their faces painted out
(``cv2.inpaint``: hands, clothes and background remain), skimage's face-free images, LFW non-face
patches and noise (all turned and flipped), and other real faces (shared aligned/grey/masked faces,
skimage's astronaut and cameraman, 100 LFW faces). A detection is a true positive when its centre
lies in a labelled face box and its size is within 2x of the box's.

Profile. Wall seconds per pass over the photos in each stage of the default detector (pyramid
levels, P-Net, all suppression, R-Net and O-Net crops and networks) and the crops per pass reaching
R-Net and O-Net, at each ``--threads`` count.

Sensitivity. Agreement with the published-style cascade when the cascade refines fewer candidates
(the ways to cut R-Net/O-Net work): P-Net suppression within a level at 0.4 instead of 0.5, only
the best P-Net proposals, a coarser pyramid step. Whichever candidate wins a face decides its
landmarks, so a changed candidate set moves them by pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from unittest.mock import patch

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "inference"))

from mtcnn_reference import ReferenceMTCNN  # noqa: E402

from codeformer_lightning.inference import detection  # noqa: E402
from codeformer_lightning.inference.detection import Face, MTCNNDetector  # noqa: E402
from codeformer_lightning.io import read_image  # noqa: E402

SHARED = ROOT / ".." / "shared" / "faces"
TRUTH = json.loads((ROOT / "tests" / "inference" / "whole_photo_faces.json").read_text())


# ----------------------------------------------------------------------------- shared helpers
def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def agreement(reference: list[Face], faces: list[Face]) -> tuple[int, int, float, float]:
    """(faces in reference, faces, worst matched IoU, worst landmark distance px) for one photo."""
    worst_iou, worst_px = 1.0, 0.0
    for ref in reference:
        if not faces:
            return len(reference), 0, 0.0, float("inf")
        best = max(faces, key=lambda f: box_iou(ref.box, f.box))
        worst_iou = min(worst_iou, box_iou(ref.box, best.box))
        worst_px = max(worst_px, float(np.linalg.norm(ref.landmarks - best.landmarks, axis=1).max()))
    return len(reference), len(faces), worst_iou, worst_px


def whole_photos() -> list[tuple[str, np.ndarray]]:
    folder = SHARED / "whole"
    if folder.is_dir():
        return [(p.name, read_image(p)) for p in sorted(folder.iterdir())]
    from skimage import data

    astronaut = data.astronaut()
    return [("astronaut", astronaut), ("astronaut pair", np.concatenate([astronaut, astronaut[:, ::-1]], 1))]


# ----------------------------------------------------------------------------- speed
#: the library's detector when issue 16 was filed: the published cascade on channels-last tensors
WAVE1 = "wave-1 default (same cascade, channels-last)"


def time_detectors(detectors: dict, photos: list[np.ndarray], repeats: int) -> dict[str, list[float]]:
    """Seconds per pass over all photos, detectors interleaved within each repeat."""
    times = {name: [] for name in detectors}
    for det in detectors.values():  # warm-up: allocator, oneDNN kernels
        det.detect(photos[0])
    for _ in range(repeats):
        for name, det in detectors.items():
            start = time.perf_counter()
            for photo in photos:
                det.detect(photo)
            times[name].append(time.perf_counter() - start)
    return times


def run_speed(threads: list[int], repeats: int) -> None:
    named = whole_photos()
    photos = [p for _, p in named]
    exact = MTCNNDetector(check_landmarks=False, skip_faces_below=0)
    detectors = {
        "published-style cascade (baseline)": ReferenceMTCNN(exact),
        WAVE1: ReferenceMTCNN(exact, channels_last=True),
        "batched, all levels, landmark check off": exact,
        "batched, all levels (skip_faces_below=0)": MTCNNDetector(skip_faces_below=0),
        "batched cascade (default detector)": MTCNNDetector(),
    }
    print(f"photos: {', '.join(f'{n} {p.shape[1]}x{p.shape[0]}' for n, p in named)}")
    print("\nagreement with the baseline (faces baseline/new, worst matched IoU, worst landmark distance px):")
    reference = [detectors["published-style cascade (baseline)"].detect(p) for p in photos]
    for name, det in list(detectors.items())[1:]:
        rows = [agreement(r, det.detect(p)) for r, p in zip(reference, photos)]
        cells = "  ".join(f"{n}: {a}/{b} {iou:.3f} {px:.2f}" for (n, _), (a, b, iou, px) in zip(named, rows))
        print(f"  {name:45s} {cells}")
    saved = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        times = time_detectors(detectors, photos, repeats)
        base = np.median(times["published-style cascade (baseline)"])
        wave1 = np.median(times[WAVE1])
        print(f"\n{count} torch thread(s), {repeats} interleaved passes over {len(photos)} photos:")
        print(f"  {'detector':45s} {'median s':>9s} {'best s':>8s} {'vs published-style':>19s} {'vs wave 1':>10s}")
        for name, values in times.items():
            median = np.median(values)
            print(f"  {name:45s} {median:9.3f} {min(values):8.3f} {base / median:18.2f}x {wave1 / median:9.2f}x")
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- profile
def timed(totals: dict[str, float], label: str | Callable[..., str], fn: Callable) -> Callable:
    """``fn`` adding its wall time to ``totals[label]``; ``label`` may be a function of the arguments."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = label(*args, **kwargs) if callable(label) else label
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def counted_crops(totals: dict[str, float], crops: dict[int, int]) -> AbstractContextManager:
    """A patch of the detector's cropping that times it into ``totals`` and counts crops by side in ``crops``."""
    def crop_label(image: np.ndarray, values: np.ndarray, boxes: np.ndarray, size: int) -> str:
        crops[size] = crops.get(size, 0) + len(boxes)
        return f"{'R' if size == 24 else 'O'}-Net crops (cv2)"

    return patch.object(detection, "_crops", timed(totals, crop_label, detection._crops))


def stage_patches(det: MTCNNDetector, totals: dict[str, float], crops: dict[int, int]) -> list[AbstractContextManager]:
    """Patches timing each stage of ``det`` into ``totals`` and counting its crops by side in ``crops``."""
    nets = [(det.pnet, "P-Net"), (det.rnet, "R-Net"), (det.onet, "O-Net")]
    return [patch.object(detection, "_draw_levels", timed(totals, "pyramid levels (cv2)", detection._draw_levels)),
            counted_crops(totals, crops),
            patch.object(detection, "nms", timed(totals, "suppression (all NMS)", detection.nms)),
            *(patch.object(net, "forward", timed(totals, label, net.forward)) for net, label in nets)]


def run_profile(threads: list[int], repeats: int) -> None:
    """Print the default detector's seconds per stage and crops per pass at each thread count."""
    photos = [p for _, p in whole_photos()]
    det = MTCNNDetector()
    saved = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        for photo in photos:  # warm-up
            det.detect(photo)
        totals: dict[str, float] = {}
        crops: dict[int, int] = {}
        patches = stage_patches(det, totals, crops)
        for p in patches:
            p.start()
        start = time.perf_counter()
        for _ in range(repeats):
            for photo in photos:
                det.detect(photo)
        total = (time.perf_counter() - start) / repeats
        for p in patches:
            p.stop()
        print(f"\ndefault detector, {count} torch thread(s), {repeats} passes over {len(photos)} photos: "
              f"{total:.3f} s per pass; crops per pass: R-Net {crops[24] // repeats}, O-Net {crops[48] // repeats}")
        for name, seconds in [*totals.items(), ("the rest (bookkeeping, host copies)", total * repeats - sum(totals.values()))]:
            print(f"  {name:38s} {seconds / repeats:7.4f} s {100 * seconds / repeats / total:5.1f}%")
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- sensitivity
class BestProposals(MTCNNDetector):
    """The default detector refining only its ``keep`` best-scored P-Net proposals."""

    keep = 100

    def _proposals(self, image: np.ndarray, values: np.ndarray) -> np.ndarray:
        rows = super()._proposals(image, values)
        return rows[np.sort(np.argsort(-rows[:, 4], kind="stable")[:self.keep])]


def per_level_nms(threshold: float) -> AbstractContextManager:
    """P-Net's suppression within each pyramid level at ``threshold`` (published: 0.5)."""
    original = detection._nms_per_group

    def at_threshold(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, _published: float) -> np.ndarray:
        return original(boxes, scores, groups, threshold)

    return patch.object(detection, "_nms_per_group", at_threshold)


def run_sensitivity() -> None:
    """Print the agreement with the published-style cascade of variants that refine fewer candidates."""
    photos = [p for _, p in whole_photos()]
    exact = MTCNNDetector(check_landmarks=False, skip_faces_below=0)
    reference = [ReferenceMTCNN(exact).detect(p) for p in photos]
    coarse = MTCNNDetector()
    coarse.pyramid_factor = 0.65
    variants = [("default detector (published settings)", MTCNNDetector(), nullcontext()),
                ("P-Net NMS within a level 0.4 (was 0.5)", MTCNNDetector(), per_level_nms(0.4)),
                (f"only the {BestProposals.keep} best P-Net proposals", BestProposals(), nullcontext()),
                ("pyramid step 0.65 (was 0.709)", coarse, nullcontext())]
    print("\nagreement with the published-style cascade when fewer candidates are refined:")
    print(f"  {'variant':42s} {'R-Net crops':>11s} {'faces':>7s} {'worst IoU':>9s} {'worst px':>8s}")
    for name, det, context in variants:
        crops: dict[int, int] = {}
        with context, counted_crops({}, crops):
            rows = [agreement(r, det.detect(p)) for r, p in zip(reference, photos)]
        found = sum(min(a, b) for a, b, _, _ in rows)  # faces found, at most those of the reference
        print(f"  {name:42s} {crops[24]:11d} {found:3d}/{sum(a for a, _, _, _ in rows):<3d} "
              f"{min(r[2] for r in rows):9.3f} {max(r[3] for r in rows):8.2f}")


# ----------------------------------------------------------------------------- quality
def transform(image: np.ndarray, boxes: list, scale: float = 1.0, flip: bool = False, angle: float = 0.0):
    """``image`` scaled, turned by ``angle`` degrees (canvas grown to hold it, black border) and
    mirrored; ``boxes`` mapped to the bounding boxes of their turned corners."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    out_w, out_h = int(round(h * sin + w * cos)), int(round(h * cos + w * sin))
    m[0, 2] += out_w / 2 - w / 2
    m[1, 2] += out_h / 2 - h / 2
    out = cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    mapped = []
    for x1, y1, x2, y2 in boxes:
        corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], float) @ m[:, :2].T + m[:, 2]
        mapped.append([*corners.min(0), *corners.max(0)])
    if flip:
        out = np.ascontiguousarray(out[:, ::-1])
        mapped = [[out_w - 1 - b[2], b[1], out_w - 1 - b[0], b[3]] for b in mapped]
    return out, mapped


def count(faces: list[Face], truth: list, ignore: list = ()) -> tuple[int, int, int]:
    """(true positives, missed faces, false positives) of ``faces`` against labelled boxes."""
    matched, false_pos = set(), 0
    for face in faces:
        cx, cy = (face.box[:2] + face.box[2:]) / 2
        hit = [i for i, b in enumerate(truth) if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]
               and 0.5 < face.size / np.sqrt((b[2] - b[0]) * (b[3] - b[1])) < 2]
        if hit:
            matched.add(hit[0])
        elif not any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in ignore):
            false_pos += 1
    return len(matched), len(truth) - len(matched), false_pos


TURNS = [(1.0, False, 0), (1.0, True, 0), (0.6, False, 0), (1.6, True, 0),
         (1.0, False, 20), (1.0, True, -25), (0.8, False, -12), (1.3, False, 10)]


def face_free(name: str, image: np.ndarray) -> np.ndarray:
    """``image`` with its labelled faces (and ignored heads) painted out from their surroundings."""
    mask = np.zeros(image.shape[:2], np.uint8)
    for x1, y1, x2, y2 in TRUTH[name]["faces"] + TRUTH[name]["ignore"]:
        w, h = x2 - x1, y2 - y1
        mask[max(0, int(y1 - 0.15 * h)):int(y2 + 0.1 * h), max(0, int(x1 - 0.1 * w)):int(x2 + 0.1 * w)] = 255
    return cv2.inpaint(image, mask, 7, cv2.INPAINT_TELEA)


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    image = image if image.ndim == 3 else np.repeat(image[..., None], 3, 2)
    return image[..., :3] if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8)


def quality_sets() -> dict[str, list[tuple[np.ndarray, list, list]]]:
    """Named lists of (image, face boxes, ignore boxes)."""
    from skimage import data

    sets: dict[str, list] = {"whole photos": [], "whole photos turned/flipped/scaled": [],
                             "whole photos, faces painted out": [], "images without faces": [], "other real faces": []}
    for name, photo in whole_photos():
        truth = TRUTH.get(name, {"faces": [], "ignore": []})
        sets["whole photos"].append((photo, truth["faces"], truth["ignore"]))
        for turn in TURNS[1:]:
            image, faces = transform(photo, truth["faces"], *turn)
            sets["whole photos turned/flipped/scaled"].append((image, faces, transform(photo, truth["ignore"], *turn)[1]))
        if name in TRUTH:
            clean = face_free(name, photo)
            for turn in [(1.0, False, 0), (1.0, True, 0), (0.75, False, -30), (1.4, True, 30), (1.0, False, 40)]:
                sets["whole photos, faces painted out"].append((transform(clean, [], *turn)[0], [], []))
    rng = np.random.default_rng(0)
    lfw = data.lfw_subset()  # 100 faces, then 100 non-face patches, 25x25
    patches = (np.clip(lfw[100:], 0, 1) * 255).astype(np.uint8)
    negatives = [_grey_rgb(getattr(data, n)()) for n in ("coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "coins", "brick", "grass", "gravel", "moon",
                 "page", "text", "horse", "clock", "cell", "logo")]
    negatives.append(_grey_rgb(np.block([[cv2.resize(p, (80, 80)) for p in patches[r * 10:r * 10 + 10]] for r in range(10)])))
    negatives.append(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))
    negatives.append(cv2.GaussianBlur(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8), (0, 0), 4))
    for image in negatives:
        for turn in [(1.0, False, 0), (1.0, True, 90), (0.7, False, 180), (1.4, True, 30)]:
            sets["images without faces"].append((transform(image, [], *turn)[0], [], []))
    sets["other real faces"] = _other_faces(lfw)
    return sets


def _other_faces(lfw: np.ndarray) -> list[tuple[np.ndarray, list, list]]:
    from skimage import data

    out = []
    for sub in ("aligned", "gray", "masked"):
        folder = SHARED / sub
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            image = read_image(path)
            h, w = image.shape[:2]
            for turn in [(0.5, False, 0), (0.5, True, 15)]:
                out.append(transform(image, [[w * 0.25, h * 0.3, w * 0.75, h * 0.8]], *turn) + ([],))
    faces = (np.clip(lfw[:100], 0, 1) * 255).astype(np.uint8)
    grid = np.block([[cv2.resize(f, (100, 100), interpolation=cv2.INTER_CUBIC) for f in faces[r * 10:r * 10 + 10]]
                     for r in range(10)])
    out.append((_grey_rgb(grid), [[c * 100 + 10, r * 100 + 10, c * 100 + 90, r * 100 + 95]
                                  for r in range(10) for c in range(10)], []))
    out.append((data.astronaut(), [[150, 30, 300, 220]], []))
    out.append((_grey_rgb(data.camera()), [[190, 100, 265, 205]], []))
    return out


def run_quality(onet_thresholds: list[float]) -> None:
    torch.set_num_threads(1)
    sets = quality_sets()
    for onet in onet_thresholds:
        thresholds = (0.6, 0.7, onet)
        before, after = MTCNNDetector(check_landmarks=False, thresholds=thresholds), MTCNNDetector(thresholds=thresholds)
        print(f"\nlandmark check: true positives / labelled faces, false positives (thresholds {thresholds})")
        quality_table(sets, before, after)


def quality_table(sets: dict, before: MTCNNDetector, after: MTCNNDetector) -> None:
    print(f"  {'set':36s} {'images':>6s} {'TP before':>10s} {'TP after':>9s} {'FP before':>10s} {'FP after':>9s}")
    for name, items in sets.items():
        totals = np.zeros((2, 3), int)
        for image, faces, ignore in items:
            for row, det in enumerate((before, after)):
                totals[row] += count(det.detect(image), faces, ignore)
        labelled = totals[0, 0] + totals[0, 1]
        print(f"  {name:36s} {len(items):6d} {totals[0, 0]:5d}/{labelled:<4d} {totals[1, 0]:4d}/{labelled:<4d} "
              f"{totals[0, 2]:10d} {totals[1, 2]:9d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="the timing part")
    parser.add_argument("--quality", action="store_true", help="the false-positive part")
    parser.add_argument("--profile", action="store_true", help="seconds per stage of the default detector")
    parser.add_argument("--sensitivity", action="store_true", help="agreement when fewer candidates are refined")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--onet-thresholds", type=float, nargs="+", default=[0.7],
                        help="O-Net cut-offs to measure the landmark check at (default: the detector's 0.7)")
    args = parser.parse_args()
    if not (args.speed or args.quality or args.profile or args.sensitivity):
        args.speed = args.quality = True  # both main parts by default
    if args.speed:
        run_speed(args.threads, args.repeats)
    if args.profile:
        run_profile(args.threads, args.repeats)
    if args.sensitivity:
        run_sensitivity()
    if args.quality:
        run_quality(args.onet_thresholds)


if __name__ == "__main__":
    main()

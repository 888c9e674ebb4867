"""``codeformer-restore INPUT... -o OUTDIR``: restore the faces of photos, folders, globs and videos.

Output layout::

    OUTDIR/cropped_faces/<name>_<k>.png          aligned input crops
    OUTDIR/restored_faces/<name>_<k>[_w<w>]<suffix>.png
    OUTDIR/final_results/<name>[_w<w>]<suffix>.png   whole photo, input size x upscale
    OUTDIR/final_results/<name><suffix>.mp4          restored videos (H.264, same frame rate, audio copied;
                                                     odd sides padded to even, see codeformer_lightning.io)
    OUTDIR/comparison/<name><suffix>.png             input | one result per w (several -w only)

Inputs are only ever read. Transparent PNG inputs keep their alpha channel in final_results.

The task follows the weights (``--task`` overrides it; see :mod:`codeformer_lightning.inference.tasks`):
restoration at ``-w`` (default 0.5), colorization at w=0, inpainting at w=1 on ``--aligned`` faces,
filling only the pure-white pixels or the white pixels of ``--mask FILE|FOLDER`` (matched by name).
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from codeformer_lightning.inference.tasks import TASKS, MaskSource, TaskError
from codeformer_lightning.io import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    BadImageError,
    VideoError,
    VideoReader,
    VideoWriter,
    composite_on_white,
    read_image_with_alpha,
    write_image,
)

OUTPUT_FOLDERS = ("cropped_faces", "restored_faces", "final_results", "comparison")


@dataclass
class Summary:
    images: int = 0
    videos: int = 0
    frames: int = 0
    faces: int = 0
    no_face: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.images + self.videos

    def report(self) -> str:
        lines = [f"processed {self.images} image(s) and {self.videos} video(s) ({self.frames} frames); "
                 f"{self.faces} face(s) restored"]
        if self.no_face:
            lines.append(f"{len(self.no_face)} without a detected face (copied through): " + ", ".join(self.no_face))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {path}: {why}" for path, why in self.skipped)
        return "\n".join(lines)


def _fidelity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fidelity must be a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0):  # above 1 is allowed (the restorer warns), as published
        raise argparse.ArgumentTypeError(f"fidelity must be a number >= 0 (usually in [0, 1]), got {value}")
    return value


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
    parser = argparse.ArgumentParser(
        prog="codeformer-restore",
        description="Restore the faces in photos and videos with a CodeFormer network.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively), glob patterns or videos")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument("--weights", required=True, type=Path,
                        help="CodeFormer weights: published .pth (e.g. codeformer.pth) or this package's .safetensors")
    parser.add_argument("-w", "--fidelity", type=_fidelity, nargs="+", default=None,
                        help="fidelity weight(s) in [0, 1]: 0 = best quality, 1 = closest to input (above 1 "
                             "extrapolates, with a warning); "
                             "several values also write a comparison grid (default: the task's published "
                             "value: 0.5 for restoration, 0 for colorization, 1 for inpainting)")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="published inference to apply (default: the weights' variant; other weight "
                             "shapes restore): restoration (-w, AdaIN), colorization (w=0, AdaIN), "
                             "inpainting (w=1, no AdaIN, only masked pixels change; --aligned faces only)")
    parser.add_argument("--mask", type=Path, default=None, metavar="FILE|FOLDER",
                        help="inpainting masks, white = fill: one file for every input, or a folder of "
                             "masks matched to the inputs by file name (default: the inputs' pure-white "
                             "pixels, all three channels 255, as published)")
    parser.add_argument("--aligned", action="store_true", help="inputs are already aligned, cropped faces")
    parser.add_argument("--upscale", type=_positive(float), default=1.0, help="output scale of whole photos")
    parser.add_argument("--only-center-face", action="store_true", help="restore only the most central face")
    parser.add_argument("--draw-box", action="store_true", help="draw detected boxes and landmarks")
    parser.add_argument("--suffix", default="", help="suffix appended to output names")
    parser.add_argument("--detector", choices=("mtcnn", "retinaface"), default="mtcnn")
    parser.add_argument("--detector-weights", type=Path, default=None,
                        help="MTCNN: a folder of pnet/rnet/onet .safetensors or .pt files (default: the "
                             "weights shipped in the package); RetinaFace: its .pth file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=_positive(int), default=8, help="faces per network call")
    parser.add_argument("--no-adain", action="store_true",
                        help="skip the AdaIN re-normalisation of the codes (default: the task's: on for "
                             "restoration and colorization, off for inpainting)")
    return parser


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively: image/video files only) and globs; returns (files, problems)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    known = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
            if not found:
                problems.append((item, "folder holds no image or video files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                problems.append((item, "pattern matches no file"))
            files.extend(found)
        else:
            problems.append((item, "no such file or folder"))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, problems


def check_output_folder(outdir: Path, inputs: Sequence[str], files: Sequence[Path]) -> str | None:
    """Why ``outdir`` is unsafe (would mix with or clobber inputs), or None when it is fine."""
    out = outdir.resolve()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folder = path.resolve()
            if out == folder or folder in out.parents:
                return (f"output folder {outdir} is inside input folder {item}: results would be read back as "
                        "inputs on the next run; choose an output folder outside the inputs")
    result_dirs = [out / name for name in OUTPUT_FOLDERS]
    for file in files:
        if any(d == file.parent or d in file.parents for d in result_dirs):
            return f"input {file} lies in the output folder's {OUTPUT_FOLDERS} and could be overwritten"
    return None


class _Namer:
    """Unique output stems: two inputs called ``a/x.jpg`` and ``b/x.png`` become ``x`` and ``x_1``."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: Path) -> str:
        stem, k = path.stem, 1
        while stem in self.used:
            stem, k = f"{path.stem}_{k}", k + 1
        self.used.add(stem)
        return stem


def _w_tag(w: float, ws: Sequence[float]) -> str:
    return f"_w{w:.2f}" if len(ws) > 1 else ""


def comparison_grid(left: np.ndarray, results: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Side-by-side ``left | results...`` (all resized to ``results[0]``'s size) with text labels."""
    height, width = results[0].shape[:2]
    tiles = [cv2.resize(left, (width, height), interpolation=cv2.INTER_CUBIC)] + list(results)
    out = []
    for tile, label in zip(tiles, ["input", *labels]):
        tile = np.ascontiguousarray(tile.copy())
        scale = max(0.3, width / 600)
        cv2.putText(tile, label, (5, int(20 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, (255, 255, 255),
                    max(1, int(2 * scale)), cv2.LINE_AA)
        out.append(tile)
    return np.concatenate(out, axis=1)


def restore_video(restorer, path: Path, target: Path, w: float, aligned: bool, batch: int,
                  masks: MaskSource | None = None) -> tuple[int, int, str]:
    """Restore every frame of ``path`` into an H.264 ``target`` at the same frame rate, reading the
    source once (:class:`~codeformer_lightning.io.VideoReader`) and writing with the package's one
    :class:`~codeformer_lightning.io.VideoWriter` (odd sizes padded to even). The first audio track
    is copied without re-encoding when the output container accepts its codec. ``masks``: the
    inpainting mask of the video (one for every frame).

    Returns ``(frames, faces, note about the audio)``; raises VideoError naming the file and
    TaskError for a mask that does not fit.
    """
    faces = 0
    with VideoReader(path) as reader:
        mask = masks.mask_for(path, (reader.height, reader.width)) if masks is not None else None
        # frame size from the first restored frame: --upscale and --aligned change it
        with VideoWriter(target, reader.rate, audio_template=reader.audio_stream) as writer:
            pending: list[np.ndarray] = []
            for frame in reader.frames(on_audio=writer.copy_audio):
                pending.append(frame)
                if len(pending) == batch:
                    faces += _write_restored(restorer, pending, w, aligned, writer, mask)
                    pending = []
            if pending:
                faces += _write_restored(restorer, pending, w, aligned, writer, mask)
            if writer.frames == 0:
                raise VideoError(f"{path}: holds no frames")
        codec = reader.audio_stream.codec_context.name if reader.audio_stream is not None else None
    if codec is None:
        note = "no audio track"
    else:
        note = f"audio ({codec}) copied" if writer.audio else "; ".join(writer.notes)
    return writer.frames, faces, note


def _write_restored(restorer, frames: list[np.ndarray], w: float, aligned: bool, writer: VideoWriter,
                    mask: np.ndarray | None = None) -> int:
    """Restore ``frames`` (their faces share the network's batches), encode them; returns the face count."""
    faces = 0
    for result in restorer.restore_batch(frames, w, aligned, [mask] * len(frames)):
        writer.write(result.image)
        faces += len(result.cropped_faces)
    return faces


def _build_restorer(args: argparse.Namespace):
    """The FaceRestorer the arguments ask for, its detector loaded now (not at the first photo);
    None after printing the reason when the weights or the detector cannot be loaded."""
    from codeformer_lightning.checkpoints import CheckpointError
    from codeformer_lightning.inference.detection import DetectorWeightsError
    from codeformer_lightning.inference.restorer import FaceRestorer

    try:
        restorer = FaceRestorer(
            args.weights, detector=args.detector, device=args.device, precision=args.precision,
            batch_size=args.batch_size, upscale=args.upscale, only_center_face=args.only_center_face,
            draw_box=args.draw_box, adain=False if args.no_adain else None, detector_weights=args.detector_weights,
            task=args.task,
        )
        if not args.aligned and restorer.task.whole_photos:
            restorer.detector  # noqa: B018 - fail now, before any file, when the detector cannot load
    except (CheckpointError, DetectorWeightsError, TypeError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    return restorer


def _task_masks(args: argparse.Namespace, restorer) -> MaskSource | None:
    """The ``--mask`` source for the restorer's task; raises TaskError with what to change when the
    task and the arguments do not fit together."""
    task = restorer.task
    if args.mask is not None and not task.masked:
        raise TaskError(f"--mask applies to inpainting; the task is {task.name} "
                        f"({'--task' if args.task else 'from the weights'}): add --task inpainting for "
                        "inpainting weights of another shape")
    if task.masked and not args.aligned:
        raise TaskError(f"{task.name} works on aligned, cropped faces only, as published: pass --aligned "
                        "with aligned 512x512 faces whose holes are white (or --mask). Whole photos are not "
                        "supported: the holes hide the eyes, nose and mouth that face detection needs")
    return MaskSource(args.mask) if args.mask is not None else None


def _print_task(args: argparse.Namespace, restorer) -> None:
    """Say once which published inference runs and what differs from it."""
    origin = "--task" if args.task else f"from the weights' variant {getattr(restorer.model, 'variant', None)!r}"
    print(f"task: {restorer.task.describe()} ({origin})", file=sys.stderr)
    for note in restorer.task_notes(args.fidelity, args.aligned):
        print(f"note: {note}", file=sys.stderr)


@dataclass
class _Pending:
    """An image whose faces are detected and aligned, waiting for the network."""

    path: Path
    name: str
    image: np.ndarray
    alpha: np.ndarray | None
    result: object


class RestoreRun:
    """One ``codeformer-restore`` run over its input files: images are prepared one by one and
    restored in pooled batches (faces of several images share the network's calls); videos go
    through :func:`restore_video`. Problems with one file are recorded in ``summary`` and the run
    goes on."""

    def __init__(self, args: argparse.Namespace, restorer, files: Sequence[Path], summary: Summary,
                 masks: MaskSource | None = None) -> None:
        self.args = args
        self.restorer = restorer
        self.summary = summary
        self.masks = masks
        self.out: Path = args.output
        self.fidelities = restorer.fidelities(args.fidelity)
        self.inputs = set(files)
        self.namer = _Namer()
        self.pending: list[_Pending] = []

    def process(self, path: Path) -> None:
        """Restore one input file (images wait in ``pending`` until a batch is full)."""
        name = self.namer(path)
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            self.flush()
            self._process_video(path, name)
        else:
            self._prepare_image(path, name)

    def _process_video(self, path: Path, name: str) -> None:
        target = self.out / "final_results" / f"{name}{self.args.suffix}.mp4"
        w = self.fidelities[0]
        if len(self.fidelities) > 1:
            print(f"note: {path}: videos use the first fidelity weight only ({w})", file=sys.stderr)
        try:
            frames, faces, audio_note = restore_video(
                self.restorer, path, target, w, self.args.aligned, self.args.batch_size, self.masks
            )
        except (VideoError, ValueError, RuntimeError, OSError) as err:  # report, go on with the rest
            self.summary.skipped.append((str(path), f"cannot process video: {err}"))
            return
        print(f"note: {path}: {frames} frames, {audio_note}", file=sys.stderr)
        self.summary.videos += 1
        self.summary.frames += frames
        self.summary.faces += faces

    def _prepare_image(self, path: Path, name: str) -> None:
        try:
            rgb, alpha = read_image_with_alpha(path)
        except BadImageError as err:
            self.summary.skipped.append((str(path), err.reason))
            return
        image = composite_on_white(rgb, alpha)
        try:
            mask = self.masks.mask_for(path, image.shape) if self.masks is not None else None
            result = self.restorer.prepare(image, self.fidelities, aligned=self.args.aligned, mask=mask)
        except TaskError as err:
            self.summary.skipped.append((str(path), str(err)))
            return
        except (ValueError, RuntimeError) as err:
            self.summary.skipped.append((str(path), f"face detection failed: {err}"))
            return
        for note in result.notes:
            print(f"note: {path}: {note}", file=sys.stderr)
        self.pending.append(_Pending(path, name, image, alpha, result))
        # faces of several images share the network's batches; few images are held at once
        batch = self.args.batch_size
        if sum(len(p.result.cropped_faces) for p in self.pending) >= batch or len(self.pending) >= batch:
            self.flush()

    def flush(self) -> None:
        """Restore the faces of the pending images in pooled batches, then write them."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            self.restorer.complete([p.image for p in pending], [p.result for p in pending])
        except (ValueError, RuntimeError) as err:  # e.g. out of memory: report these, go on
            self.summary.skipped.extend((str(p.path), f"restoration failed: {err}") for p in pending)
            return
        for item in pending:
            try:
                self._save_result(item)
            except OSError as err:
                self.summary.skipped.append((str(item.path), f"cannot write results: {err}"))
                continue
            self.summary.images += 1
            self.summary.faces += len(item.result.cropped_faces)
            if not self.args.aligned and not item.result.faces:
                self.summary.no_face.append(str(item.path))

    def _save(self, path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
        if path.resolve() in self.inputs:  # belt and braces: never write over an input
            raise FileExistsError(f"refusing to overwrite input {path}")
        write_image(path, rgb, alpha)

    def _save_result(self, item: _Pending) -> None:
        """Crops, restored faces, whole results (alpha kept) and, for several w, a comparison grid."""
        result, ws, suffix = item.result, self.fidelities, self.args.suffix
        for k, crop in enumerate(result.cropped_faces):
            self._save(self.out / "cropped_faces" / f"{item.name}_{k:02d}.png", crop)
            for w in ws:
                self._save(self.out / "restored_faces" / f"{item.name}_{k:02d}{_w_tag(w, ws)}{suffix}.png",
                           result.restored_faces[w][k])
        final_alpha = None
        if item.alpha is not None and not self.args.aligned:
            height, width = result.image.shape[:2]
            final_alpha = cv2.resize(item.alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        for w in ws:
            self._save(self.out / "final_results" / f"{item.name}{_w_tag(w, ws)}{suffix}.png",
                       result.images[w], final_alpha)
        if len(ws) > 1:
            left = result.cropped_faces[0] if self.args.aligned else item.image
            grid = comparison_grid(left, [result.images[w] for w in ws], [f"w={w:.2f}" for w in ws])
            self._save(self.out / "comparison" / f"{item.name}{suffix}.png", grid)


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file (give the path of codeformer.pth or a .safetensors file)")
    if "/" in args.suffix or "\\" in args.suffix:
        parser.error(f"--suffix {args.suffix!r} must not contain path separators")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 when at least one input was processed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    files, problems = collect_inputs(args.inputs)
    summary = Summary(skipped=list(problems))
    if not files:
        print(summary.report(), file=sys.stderr)
        print("error: no input files found", file=sys.stderr)
        return 1
    unsafe = check_output_folder(args.output, args.inputs, files)
    if unsafe:
        parser.error(unsafe)
    restorer = _build_restorer(args)
    if restorer is None:
        return 2
    try:
        masks = _task_masks(args, restorer)
    except TaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_task(args, restorer)
    run = RestoreRun(args, restorer, files, summary, masks)
    for path in tqdm(files, desc="restoring", unit="file", file=sys.stderr, dynamic_ncols=True):
        run.process(path)
    run.flush()
    print(summary.report(), file=sys.stderr)
    if summary.processed == 0:
        print("error: no input could be processed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``codeformer-restore INPUT... -o OUTDIR``: restore the faces of photos, folders, globs and videos.

Output layout::

    OUTDIR/cropped_faces/<name>_<k>.png          aligned input crops
    OUTDIR/restored_faces/<name>_<k>[_w<w>]<suffix>.png
    OUTDIR/final_results/<name>[_w<w>]<suffix>.png   whole photo, input size x upscale
    OUTDIR/final_results/<name><suffix>.mp4          restored videos (H.264, same frame rate, audio copied)
    OUTDIR/comparison/<name><suffix>.png             input | one result per w (several -w only)

Inputs are only ever read. Transparent PNG inputs keep their alpha channel in final_results.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from codeformer_lightning.inference.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    composite_on_white,
    read_image_with_alpha,
    write_image,
)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm"})
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
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"fidelity must lie in [0, 1], got {value}")
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
    parser.add_argument("-w", "--fidelity", type=_fidelity, nargs="+", default=[0.5],
                        help="fidelity weight(s) in [0, 1]: 0 = best quality, 1 = closest to input; "
                             "several values also write a comparison grid (default 0.5)")
    parser.add_argument("--aligned", action="store_true", help="inputs are already aligned, cropped faces")
    parser.add_argument("--upscale", type=_positive(float), default=1.0, help="output scale of whole photos")
    parser.add_argument("--only-center-face", action="store_true", help="restore only the most central face")
    parser.add_argument("--draw-box", action="store_true", help="draw detected boxes and landmarks")
    parser.add_argument("--suffix", default="", help="suffix appended to output names")
    parser.add_argument("--detector", choices=("mtcnn", "retinaface"), default="mtcnn")
    parser.add_argument("--detector-weights", type=Path, default=None,
                        help="MTCNN weight folder (default: facenet-pytorch's) or RetinaFace .pth file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=_positive(int), default=8, help="faces per network call")
    parser.add_argument("--no-adain", action="store_true", help="skip the AdaIN re-normalisation of the codes")
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


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def _video_rate(path: Path) -> Fraction:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return Fraction(rate) if rate else Fraction(25)


def _copy_audio_packets(source: Path, out, audio_stream) -> None:
    import av

    with av.open(str(source)) as container:
        for packet in container.demux(container.streams.audio[0]):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            packet.stream = audio_stream
            out.mux(packet)


def restore_video(restorer, path: Path, target: Path, w: float, aligned: bool, batch: int) -> tuple[int, int, str]:
    """Restore every frame of ``path`` into an H.264 ``target`` at the same frame rate.

    The first audio track is copied without re-encoding when the output container accepts its
    codec. Returns ``(frames, faces, note about the audio)``.
    """
    import av

    rate = _video_rate(path)
    with av.open(str(path)) as probe:
        audio_template = probe.streams.audio[0] if probe.streams.audio else None
        audio_codec = audio_template.codec_context.name if audio_template is not None else None
    frames = faces = 0
    audio_note = "no audio track"
    with av.open(str(target), mode="w") as out:
        stream = audio_out = None

        def open_streams(height: int, width: int) -> None:
            nonlocal stream, audio_out, audio_note
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height = width // 2 * 2, height // 2 * 2  # yuv420p needs even sizes
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            if audio_codec is not None:
                try:
                    with av.open(str(path)) as source:
                        audio_out = out.add_stream_from_template(source.streams.audio[0])
                    audio_note = f"audio ({audio_codec}) copied"
                except Exception as err:  # codec not allowed in this container
                    audio_note = f"audio ({audio_codec}) not copied: {err}"

        def write(images: list[np.ndarray]) -> None:
            nonlocal frames, faces
            for result in restorer.restore_batch(images, w, aligned):
                image = result.image
                if stream is None:
                    open_streams(*image.shape[:2])
                image = np.ascontiguousarray(image[: stream.height, : stream.width])
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
                frames += 1
                faces += len(result.cropped_faces)

        pending: list[np.ndarray] = []
        for frame in _video_frames(path):
            pending.append(frame)
            if len(pending) == batch:
                write(pending)
                pending = []
        if pending:
            write(pending)
        if stream is None:
            raise ValueError("video holds no frames")
        for packet in stream.encode():
            out.mux(packet)
        if audio_out is not None:
            try:
                _copy_audio_packets(path, out, audio_out)
            except Exception as err:
                audio_note = f"audio ({audio_codec}) not copied: {err}"
    return frames, faces, audio_note


def _progress(items: Sequence[Path]):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        return items
    return tqdm(items, desc="restoring", unit="file", file=sys.stderr, dynamic_ncols=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 when at least one input was processed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file (give the path of codeformer.pth or a .safetensors file)")
    if "/" in args.suffix or "\\" in args.suffix:
        parser.error(f"--suffix {args.suffix!r} must not contain path separators")
    files, problems = collect_inputs(args.inputs)
    summary = Summary(skipped=list(problems))
    if not files:
        print(summary.report(), file=sys.stderr)
        print("error: no input files found", file=sys.stderr)
        return 1
    unsafe = check_output_folder(args.output, args.inputs, files)
    if unsafe:
        parser.error(unsafe)

    from codeformer_lightning.checkpoints import CheckpointError
    from codeformer_lightning.inference.detection import DetectorWeightsError
    from codeformer_lightning.inference.restorer import FaceRestorer

    try:
        restorer = FaceRestorer(
            args.weights, detector=args.detector, device=args.device, precision=args.precision,
            batch_size=args.batch_size, upscale=args.upscale, only_center_face=args.only_center_face,
            draw_box=args.draw_box, adain=not args.no_adain, detector_weights=args.detector_weights,
        )
        if not args.aligned:
            restorer.detector  # noqa: B018 - fail now, before any file, when the detector cannot load
    except (CheckpointError, DetectorWeightsError, TypeError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = args.output
    inputs_resolved = set(files)
    namer = _Namer()
    ws = list(dict.fromkeys(args.fidelity))

    def save(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
        if path.resolve() in inputs_resolved:  # belt and braces: never write over an input
            raise FileExistsError(f"refusing to overwrite input {path}")
        write_image(path, rgb, alpha)

    pending: list[tuple[Path, str, np.ndarray, np.ndarray | None, object]] = []

    def save_result(path: Path, name: str, image: np.ndarray, alpha: np.ndarray | None, result) -> None:
        for k, crop in enumerate(result.cropped_faces):
            save(out / "cropped_faces" / f"{name}_{k:02d}.png", crop)
            for w in ws:
                save(out / "restored_faces" / f"{name}_{k:02d}{_w_tag(w, ws)}{args.suffix}.png",
                     result.restored_faces[w][k])
        final_alpha = None
        if alpha is not None and not args.aligned:
            height, width = result.image.shape[:2]
            final_alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        for w in ws:
            save(out / "final_results" / f"{name}{_w_tag(w, ws)}{args.suffix}.png", result.images[w], final_alpha)
        if len(ws) > 1:
            left = result.cropped_faces[0] if args.aligned else image
            grid = comparison_grid(left, [result.images[w] for w in ws], [f"w={w:.2f}" for w in ws])
            save(out / "comparison" / f"{name}{args.suffix}.png", grid)

    def flush() -> None:
        """Restore the faces of the pending images in pooled batches, then write them."""
        if not pending:
            return
        try:
            restorer.complete([p[2] for p in pending], [p[4] for p in pending])
        except (ValueError, RuntimeError) as err:  # e.g. out of memory: report these, go on
            summary.skipped.extend((str(p[0]), f"restoration failed: {err}") for p in pending)
            pending.clear()
            return
        for path, name, image, alpha, result in pending:
            try:
                save_result(path, name, image, alpha, result)
            except OSError as err:
                summary.skipped.append((str(path), f"cannot write results: {err}"))
                continue
            summary.images += 1
            summary.faces += len(result.cropped_faces)
            if not args.aligned and not result.faces:
                summary.no_face.append(str(path))
        pending.clear()

    for path in _progress(files):
        name = namer(path)
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            flush()
            target = out / "final_results" / f"{name}{args.suffix}.mp4"
            if len(ws) > 1:
                print(f"note: {path}: videos use the first fidelity weight only ({ws[0]})", file=sys.stderr)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                frames, faces, audio_note = restore_video(restorer, path, target, ws[0], args.aligned,
                                                          args.batch_size)
            except Exception as err:  # any decoder failure: report, go on with the rest
                summary.skipped.append((str(path), f"cannot process video: {err}"))
                continue
            print(f"note: {path}: {frames} frames, {audio_note}", file=sys.stderr)
            summary.videos += 1
            summary.frames += frames
            summary.faces += faces
            continue
        try:
            rgb, alpha = read_image_with_alpha(path)
        except ImageReadError as err:
            summary.skipped.append((str(path), err.reason))
            continue
        image = composite_on_white(rgb, alpha)
        try:
            result = restorer.prepare(image, ws, aligned=args.aligned)
        except (ValueError, RuntimeError) as err:
            summary.skipped.append((str(path), f"face detection failed: {err}"))
            continue
        for note in result.notes:
            print(f"note: {path}: {note}", file=sys.stderr)
        pending.append((path, name, image, alpha, result))
        # faces of several images share the network's batches; few images are held at once
        if sum(len(p[4].cropped_faces) for p in pending) >= args.batch_size or len(pending) >= args.batch_size:
            flush()
    flush()

    report = summary.report()
    print(report, file=sys.stderr)
    if summary.processed == 0:
        print("error: no input could be processed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

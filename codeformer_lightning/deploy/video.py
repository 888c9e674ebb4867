"""Restore every face of a video: faces from many frames share the network's batches, and alignment
and paste-back run on the device (:mod:`.batched`), so frames cross to the host only to be decoded,
searched for faces and encoded.

    restorer = BatchedVideoRestorer("codeformer.pth", device="cuda", batch_size=16)
    report = restorer.restore_video("in.mp4", "out.mp4", w=0.5)

Command: ``codeformer-restore-video IN OUT --weights W -w 0.5 --batch-size 16 --device cuda``.

The task follows the weights' variant (``task=`` overrides, see :mod:`codeformer_lightning.inference.tasks`):
restoration at ``w`` (default 0.5), colorization at w=0 with AdaIN (the faces are colourised, the rest of
each frame is left as it is). Inpainting works on aligned faces only and is refused here: video frames
are whole pictures (``codeformer-restore --aligned`` restores videos of aligned faces).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..inference.align import estimate_alignment, warp_face
from ..inference.detection import Detector, MTCNNDetector
from ..inference.paste import paste_back
from ..inference.restorer import center_face, precision_autocast
from ..inference.tasks import Task, TaskError, override_note, task_of_model, whole_photo_note
from ..io import VideoReader, VideoWriter
from ..nn import CodeFormer
from .batched import paste_faces, warp_faces

PRECISIONS = ("fp32", "bf16", "fp16")
GEOMETRY_BACKENDS = ("auto", "torch", "cv2")


@dataclass
class VideoReport:
    """What :meth:`BatchedVideoRestorer.restore_video` did.

    frames: frames written; faces: faces restored; fps: the output's frame rate; audio: whether an
    audio stream was copied; seconds: wall time per stage (decode, detect, align, network, paste,
    encode); notes: anything the user should know (frames without faces, audio not copied, ...).
    """

    frames: int = 0
    faces: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    audio: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    notes: list[str] = field(default_factory=list)


class BatchedVideoRestorer:
    """CodeFormer over video frames with faces pooled across frames.

    ``model_or_weights``: a :class:`CodeFormer` or a weight file for
    :func:`~codeformer_lightning.checkpoints.load_pretrained`. ``detector``: anything with
    ``detect(image (H,W,3) uint8 RGB) -> list[Face]``; default an :class:`MTCNNDetector` on the CPU
    (``detector_weights``: its weight folder). ``batch_size``: faces per network call.
    ``chunk_frames``: frames held on the device at once (bounds memory; faces of a chunk are batched
    together). ``precision``: ``"bf16"``/``"fp16"`` autocast the network (fp16 only on CUDA).
    ``profile``: synchronise the device around each stage so that ``timings`` are exact.
    ``geometry``: how crops are cut and pasted back: ``"torch"`` (batched ``grid_sample`` on the
    device, no host round trip: the path for GPUs), ``"cv2"`` (OpenCV's uint8 warps on the host, face
    by face, the network still batched across frames: faster on CPUs, where there is no round trip
    to save), or ``"auto"`` (cv2 on CPU devices, torch elsewhere). ``task``: the published inference
    to apply (default: the weights' variant): its default ``w`` and AdaIN (``adain`` overrides the
    latter); inpainting raises :class:`~codeformer_lightning.inference.tasks.TaskError`.
    """

    def __init__(
        self,
        model_or_weights: nn.Module | str | Path,
        detector: Detector | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        chunk_frames: int = 32,
        adain: bool | None = None,
        precision: str = "fp32",
        only_center_face: bool = False,
        feather: int | None = None,
        detector_weights: str | Path | None = None,
        profile: bool = False,
        geometry: str = "auto",
        task: str | Task | None = None,
    ) -> None:
        if geometry not in GEOMETRY_BACKENDS:
            raise ValueError(f"geometry must be one of {GEOMETRY_BACKENDS}, got {geometry!r}")
        if batch_size < 1 or chunk_frames < 1:
            raise ValueError(f"batch_size and chunk_frames must be >= 1, got {batch_size}, {chunk_frames}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
        if isinstance(model_or_weights, nn.Module):
            model = model_or_weights
        else:
            from ..checkpoints import load_pretrained

            model = load_pretrained(model_or_weights)
        if not isinstance(model, CodeFormer):
            raise TypeError(f"{model_or_weights!s:.200} is a {type(model).__name__}, not a CodeFormer restoration network")
        self.task = task_of_model(model, task)
        if not self.task.whole_photos:
            raise TaskError(f"{self.task.name} works on aligned faces only, and video frames are whole pictures: "
                            "restore a video of aligned faces with codeformer-restore --aligned")
        self.model = model.to(self.device).eval()
        self.face_size = int(model.img_size)
        self.batch_size = int(batch_size)
        self.chunk_frames = int(chunk_frames)
        self.adain = self.task.adain if adain is None else bool(adain)
        self.precision = precision
        self.only_center_face = only_center_face
        self.feather = feather
        self.profile = profile
        self.geometry = geometry if geometry != "auto" else ("cv2" if self.device.type == "cpu" else "torch")
        self.timings: dict[str, float] = defaultdict(float)
        self._detector = detector
        self._detector_weights = detector_weights

    # ------------------------------------------------------------------ pieces
    @property
    def detector(self) -> Detector:
        """The face detector (MTCNN on the CPU unless one was given), built on first use."""
        if self._detector is None:
            self._detector = MTCNNDetector(self._detector_weights, device="cpu")
        return self._detector

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] += time.perf_counter() - start

    def find_faces(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Detect and align: ``affines (F, 2, 3)`` float64 image -> crop, ``frame_index (F,)`` int64."""
        affines, index = [], []
        with self._timed("detect"):
            for n, frame in enumerate(frames):
                faces = self.detector.detect(frame)
                if self.only_center_face:
                    faces = center_face(faces, frame.shape)
                for face in faces:
                    affines.append(estimate_alignment(face.landmarks, self.face_size))
                    index.append(n)
        return np.asarray(affines, np.float64).reshape(-1, 2, 3), np.asarray(index, np.int64)

    def _autocast(self):
        return precision_autocast(self.device, self.precision)

    @torch.inference_mode()
    def restore_crops(self, crops: torch.Tensor, w: float | None = None) -> torch.Tensor:
        """Aligned crops ``(F, 3, S, S)`` float in [0, 255] -> restored ``(F, 3, S, S)`` float in [0, 255]
        (``w``: default the task's)."""
        w = self.task.w if w is None else w
        out = torch.empty_like(crops)
        for start in range(0, crops.shape[0], self.batch_size):
            x = crops[start : start + self.batch_size].float() / 127.5 - 1.0
            with self._autocast():
                y = self.model(x, w=w, adain=self.adain)
            out[start : start + self.batch_size] = (y.float().clamp(-1, 1) + 1.0) * 127.5
        return out

    @torch.inference_mode()
    def restore_tensor(self, frames: torch.Tensor, affines: np.ndarray, frame_index: np.ndarray,
                       w: float | None = None) -> torch.Tensor:
        """Frames ``(N, 3, H, W)`` on the device, float in [0, 255] or uint8 -> restored frames, same layout
        and dtype (uint8 frames get each pasted face rounded, as the single-face path does).

        ``affines`` ``(F, 2, 3)`` and ``frame_index`` ``(F,)`` as from :meth:`find_faces`.
        """
        return self._restore_tensor(frames, affines, frame_index, w, inplace=False)

    def _restore_tensor(self, frames: torch.Tensor, affines: np.ndarray, frame_index: np.ndarray, w: float,
                        inplace: bool) -> torch.Tensor:
        if len(frame_index) == 0:
            return frames
        with self._timed("align"):
            # the single-face path cuts uint8 crops; rounding here feeds the network the same values
            crops = warp_faces(frames, affines, frame_index, self.face_size).round_().clamp_(0, 255)
        with self._timed("network"):
            restored = self.restore_crops(crops, w)
        with self._timed("paste"):
            return paste_faces(frames, restored, affines, frame_index, self.feather, inplace=inplace)

    def restore_frames(self, frames: Sequence[np.ndarray], w: float | None = None) -> list[np.ndarray]:
        """Restore frames ``(H, W, 3)`` uint8 RGB (all one size); returns new frames, same layout."""
        if not frames:
            return []
        shapes = {f.shape for f in frames}
        if len(shapes) != 1 or any(f.dtype != np.uint8 for f in frames) or next(iter(shapes))[-1:] != (3,):
            raise ValueError(f"frames must all be (H, W, 3) uint8 RGB of one size, got shapes {sorted(shapes)}")
        out: list[np.ndarray] = []
        for start in range(0, len(frames), self.chunk_frames):
            chunk = frames[start : start + self.chunk_frames]
            affines, index = self.find_faces(chunk)
            out.extend(self._restore_chunk(chunk, affines, index, w))
        return out

    @torch.inference_mode()
    def _restore_chunk(self, chunk: Sequence[np.ndarray], affines: np.ndarray, index: np.ndarray, w: float) -> list[np.ndarray]:
        if len(index) == 0:
            return [f.copy() for f in chunk]
        if self.geometry == "cv2":
            return self._restore_chunk_cv2(chunk, affines, index, w)
        with self._timed("upload"):
            # uint8 all the way: a quarter of the bytes to move, no whole-frame float copy to round back,
            # and on the CPU the batch is pasted straight into the stacked array (no copy at all)
            frames = torch.from_numpy(np.stack(chunk)).to(self.device).permute(0, 3, 1, 2)
        restored = self._restore_tensor(frames, affines, index, w, inplace=True)
        with self._timed("download"):
            result = restored.permute(0, 2, 3, 1).cpu().numpy()
        return list(result)

    def _restore_chunk_cv2(self, chunk: Sequence[np.ndarray], affines: np.ndarray, index: np.ndarray,
                           w: float) -> list[np.ndarray]:
        with self._timed("align"):
            crops = np.stack([warp_face(chunk[i], a, self.face_size) for a, i in zip(affines, index)])
        with self._timed("network"):
            # float crops: restore_crops writes into a tensor of its input's dtype, and uint8 would truncate
            x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
            restored = self.restore_crops(x, w).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        with self._timed("paste"):
            out = []
            for n, frame in enumerate(chunk):
                mine = np.flatnonzero(index == n)
                out.append(paste_back(frame, [restored[k] for k in mine], [affines[k] for k in mine], self.feather)
                           if len(mine) else frame.copy())
        return out

    # ------------------------------------------------------------------ files
    def restore_video(self, src: str | Path, dst: str | Path, w: float | None = None, codec: str = "libx264",
                      crf: int = 18, copy_audio: bool = True) -> VideoReport:
        """Restore ``src`` into ``dst`` at the same frame rate and size; copy its first audio stream
        (``w``: default the task's; another one for colorization is noted in the report).

        Reads the source once and writes with the package's one writer
        (:class:`~codeformer_lightning.io.VideoWriter`): constant frame rate (the input's average
        rate), yuv420p, odd sides padded to even by repeating the last row / column. Raises
        :class:`~codeformer_lightning.io.VideoError` naming the file when it cannot be read or written.
        """
        w = self.task.w if w is None else w
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"fidelity weight w must lie in [0, 1], got {w}")
        report = VideoReport()
        report.notes.extend(n for n in (override_note(self.task, [w], self.adain), whole_photo_note(self.task)) if n)
        self.timings = defaultdict(float)
        with VideoReader(src) as reader:
            audio = reader.audio_stream if copy_audio else None
            with VideoWriter(dst, reader.rate, (reader.width, reader.height), codec, crf, audio) as writer:
                frames = reader.frames(on_audio=writer.copy_audio)
                for chunk in self._decoded_chunks(frames):
                    self._restore_and_write(chunk, float(w), writer, report)
        report.audio = writer.audio
        report.notes.extend(writer.notes)
        report.fps = float(reader.rate)
        report.width, report.height = writer.size
        report.seconds = dict(self.timings)
        if report.faces == 0:
            report.notes.append("no face found in any frame: frames re-encoded unchanged")
        return report

    def _decoded_chunks(self, frames: Iterator[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """``frames`` in lists of ``chunk_frames``; the time spent decoding is counted as "decode"."""
        chunk: list[np.ndarray] = []
        while True:
            start = time.perf_counter()
            frame = next(frames, None)
            self.timings["decode"] += time.perf_counter() - start
            if frame is None:
                break
            chunk.append(frame)
            if len(chunk) == self.chunk_frames:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _restore_and_write(self, chunk: list[np.ndarray], w: float, writer: VideoWriter,
                           report: VideoReport) -> None:
        """Detect, restore and encode one chunk of frames."""
        affines, index = self.find_faces(chunk)
        restored = self._restore_chunk(chunk, affines, index, w)
        with self._timed("encode"):
            for image in restored:
                writer.write(image)
        report.faces += len(index)
        report.frames += len(chunk)


# ----------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codeformer-restore-video",
        description="Restore every face of a video with CodeFormer; faces of many frames are restored in "
        "batches and pasted back on the device. Keeps frame rate and size, copies the audio stream.",
    )
    parser.add_argument("input", help="input video (anything FFmpeg reads)")
    parser.add_argument("output", help="output video (.mp4 recommended)")
    parser.add_argument("--weights", required=True, help="CodeFormer weights: published codeformer.pth or our .safetensors")
    parser.add_argument("-w", "--fidelity", type=float, default=None,
                        help="fidelity weight in [0, 1]: 0 = strongest restoration, 1 = closest to the input "
                        "(default: the task's published value: 0.5 for restoration, 0 for colorization)")
    parser.add_argument("--task", choices=("restoration", "colorization"), default=None,
                        help="published inference to apply (default: the weights' variant; inpainting works "
                        "on aligned faces only: use codeformer-restore --aligned)")
    parser.add_argument("--batch-size", type=int, default=16, help="faces per network call (default 16)")
    parser.add_argument("--chunk-frames", type=int, default=32, help="frames held on the device at once (default 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="network precision (fp16: CUDA only)")
    parser.add_argument("--no-adain", action="store_true",
                        help="skip AdaIN of the codebook features (published restoration and colorization: on)")
    parser.add_argument("--geometry", choices=GEOMETRY_BACKENDS, default="auto",
                        help="crop/paste-back: torch (batched on the device), cv2 (host, fastest on CPU), "
                        "auto (cv2 on CPU, torch on GPU; default)")
    parser.add_argument("--only-center-face", action="store_true", help="restore only the face nearest the frame centre")
    parser.add_argument("--detector-weights", default=None,
                        help="MTCNN weights: a folder of pnet/rnet/onet .safetensors or .pt files (default: the "
                        "weights shipped in the package)")
    parser.add_argument("--codec", default="libx264", help="video encoder (default libx264)")
    parser.add_argument("--crf", type=int, default=18, help="libx264 quality, lower is better (default 18)")
    parser.add_argument("--no-audio", action="store_true", help="do not copy the audio stream")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``codeformer-restore-video``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if not Path(args.weights).is_file():
        print(f"codeformer-restore-video: weight file {args.weights} not found. Download codeformer.pth yourself "
              "and pass its local path with --weights (nothing is downloaded).", file=sys.stderr)
        return 2
    try:
        restorer = BatchedVideoRestorer(
            args.weights, device=args.device, batch_size=args.batch_size, chunk_frames=args.chunk_frames,
            adain=False if args.no_adain else None, precision=args.precision,
            only_center_face=args.only_center_face, detector_weights=args.detector_weights, geometry=args.geometry,
            task=args.task,
        )
        print(f"task: {restorer.task.describe()}", file=sys.stderr)
    except TaskError as exc:
        print(f"codeformer-restore-video: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # CheckpointError, DetectorWeightsError name their file
        print(f"codeformer-restore-video: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        start = time.perf_counter()
        report = restorer.restore_video(args.input, args.output, w=args.fidelity, codec=args.codec, crf=args.crf,
                                        copy_audio=not args.no_audio)
    except Exception as exc:  # VideoError, CheckpointError, DetectorWeightsError all name their file
        print(f"codeformer-restore-video: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(report.seconds.items()))
    print(f"wrote {args.output}: {report.frames} frames ({report.width}x{report.height} @ {report.fps:.3g} fps), "
          f"{report.faces} faces, audio {'copied' if report.audio else 'none'}; "
          f"{report.frames / max(elapsed, 1e-9):.2f} frames/s ({stages})")
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`FaceRestorer`: detect, align, restore in batches and paste back faces of whole photos."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from codeformer_lightning.inference.align import estimate_alignment, rescale_affine, warp_face
from codeformer_lightning.inference.detection import Detector, Face, MTCNNDetector
from codeformer_lightning.inference.paste import paste_back
from codeformer_lightning.inference.tasks import (
    Task,
    TaskError,
    checked_mask,
    composite,
    fill_white,
    override_note,
    resize_mask,
    task_of_model,
    white_mask,
    whole_photo_note,
)
from codeformer_lightning.nn import CodeFormer
from codeformer_lightning.nn.codeformer import warn_above_one
from codeformer_lightning.nn.fused import retain_freed_cpu_memory

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RestoreResult:
    """What :meth:`FaceRestorer.restore` produced for one image.

    ``ws``: the fidelity values w, in the order asked. ``aligned``: the input was an aligned face.
    ``faces``: detections in the input image's pixels (empty for aligned input). ``affines``: ``(2, 3)`` input image -> aligned crop.
    ``cropped_faces``: aligned input crops ``(S, S, 3)`` uint8 RGB. ``restored_faces[w]``: restored
    crops per weight. ``images[w]``: the whole photo with faces pasted back, ``(H*u, W*u, 3)``
    uint8 RGB for upscale ``u`` (for aligned input: the restored face). ``notes``: what a user
    should know (no face found, image stretched, ...). ``task``: the task run
    (:mod:`~codeformer_lightning.inference.tasks`); ``masks``: per crop ``(S, S)`` bool, the pixels
    inpainting fills (inpainting only). ``upscale`` / ``only_center_face``: this image's options.
    """

    ws: list[float]
    aligned: bool = False
    task: str = "restoration"
    upscale: float = 1.0
    only_center_face: bool = False
    faces: list[Face] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    cropped_faces: list[np.ndarray] = field(default_factory=list)
    restored_faces: dict[float, list[np.ndarray]] = field(default_factory=dict)
    images: dict[float, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def image(self) -> np.ndarray:
        """The result for the first fidelity weight."""
        return self.images[self.ws[0]]


def _as_fidelities(w: float | Sequence[float] | np.ndarray | torch.Tensor) -> list[float]:
    """The fidelity values to restore with: a number or several (list, tuple, array, tensor), each finite
    and >= 0; above 1 is allowed with a warning, as in the published inference."""
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().numpy()
    try:
        ws = [float(w)] if np.ndim(w) == 0 else [float(v) for v in np.ravel(w)]
    except (TypeError, ValueError):
        raise TypeError(f"w must be a number or a sequence of numbers, got {w!r}") from None
    if not ws:
        raise ValueError("at least one fidelity weight w is needed")
    bad = [v for v in ws if not (np.isfinite(v) and v >= 0.0)]
    if bad:
        raise ValueError(f"fidelity values w must be finite and >= 0 (0 = quality, 1 = fidelity), got {bad}")
    for v in ws:
        warn_above_one(v)
    return list(dict.fromkeys(ws))  # unique, order kept


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width < image.shape[1] and height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be (H, W, 3) uint8 RGB arrays, got {getattr(image, 'shape', type(image))} "
                         f"{getattr(image, 'dtype', '')}; read files with codeformer_lightning.io.read_image()")


def draw_boxes(image: np.ndarray, faces: Sequence[Face], scale: float = 1.0) -> np.ndarray:
    """Copy of ``image`` (H,W,3) uint8 with detection boxes (green) and landmarks (red) drawn."""
    out = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (face.box * scale).round().astype(int)
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2), int(y2)), (0, 255, 0), thickness)
        for x, y in (face.landmarks * scale).round().astype(int):
            cv2.circle(out, (int(x), int(y)), thickness + 1, (255, 0, 0), -1)
    return out


def precision_autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` in {"fp32", "bf16", "fp16"} on ``device`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def center_face(faces: list[Face], image_shape: tuple[int, ...]) -> list[Face]:
    """The one face whose box centre is nearest the image centre (all faces when there are fewer than 2)."""
    if len(faces) <= 1:
        return faces
    centre = np.array([image_shape[1] / 2.0, image_shape[0] / 2.0])
    return [min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2.0 - centre)))]


class FaceRestorer:
    """Restore every face of whole photos (or already aligned faces) with a CodeFormer network.

    ``model_or_weights``: a :class:`CodeFormer` or a weight file readable by
    :func:`codeformer_lightning.checkpoints.load_pretrained`. ``detector``: ``None``/``"mtcnn"``
    (default, offline), ``"retinaface"`` (needs ``detector_weights``) or any object with
    ``detect(image) -> list[Face]``; created on first use. ``precision``: ``"bf16"``/``"fp16"``
    autocast the network on CUDA (``"bf16"`` also on CPU). ``batch_size``: faces per network call.
    ``face_size``: side of the aligned crops (default: the network's ``img_size``; other sizes are
    resized to it for the network). ``upscale``: integer or float factor of the output photo, made
    by ``background_upsampler(image, upscale)`` when given, else bicubic. ``only_center_face``: keep
    the face nearest the image centre (both also per call of :meth:`prepare`). ``draw_box``: draw
    detections on the outputs. ``task``: ``"restoration"``, ``"colorization"`` or ``"inpainting"``
    (default: the weights' variant, ``model.variant``), whose published inference is applied
    (:mod:`~codeformer_lightning.inference.tasks`): its default ``w``, its AdaIN and, for
    inpainting, only the masked pixels changed. ``adain``: override the task's AdaIN choice.
    On CPU in fp32 the network runs its fused oneDNN path (:mod:`codeformer_lightning.nn.fused`), and
    the process keeps freed activation memory in its heap (``retain_freed_cpu_memory``, process-wide).
    """

    def __init__(
        self,
        model_or_weights: nn.Module | str | Path,
        detector: None | str | Detector = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        batch_size: int = 8,
        face_size: int | None = None,
        upscale: float = 1,
        only_center_face: bool = False,
        draw_box: bool = False,
        adain: bool | None = None,
        background_upsampler: Callable[[np.ndarray, float], np.ndarray] | None = None,
        detector_weights: str | Path | None = None,
        task: str | Task | None = None,
    ) -> None:
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if upscale <= 0:
            raise ValueError(f"upscale must be positive, got {upscale}")
        if isinstance(model_or_weights, nn.Module):
            model = model_or_weights
        else:
            from codeformer_lightning.checkpoints import load_pretrained

            model = load_pretrained(model_or_weights)
        if not isinstance(model, CodeFormer):
            raise TypeError(
                f"{model_or_weights if not isinstance(model_or_weights, nn.Module) else 'the model'} holds a "
                f"{type(model).__name__}, not a CodeFormer restoration network")
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":  # the fused CPU path then reuses its activations' memory (see nn.fused)
            retain_freed_cpu_memory()
        self.net_size = int(model.config["img_size"])
        self.face_size = int(face_size) if face_size else self.net_size
        self.precision = precision
        self.batch_size = int(batch_size)
        self.upscale = upscale
        self.only_center_face = only_center_face
        self.draw_box = draw_box
        self.task = task_of_model(model, task)
        self.adain = self.task.adain if adain is None else bool(adain)
        self.background_upsampler = background_upsampler
        self._detector_spec = detector
        self._detector_weights = detector_weights
        self._detector: Detector | None = None if detector is None or isinstance(detector, str) else detector

    # ------------------------------------------------------------------ pieces
    @property
    def detector(self) -> Detector:
        """The face detector, built on first use (aligned-only runs never need one)."""
        if self._detector is None:
            spec = self._detector_spec or "mtcnn"
            if spec == "mtcnn":
                self._detector = MTCNNDetector(self._detector_weights, device=self.device)
            elif spec == "retinaface":
                from codeformer_lightning.inference.detection import RetinaFaceDetector

                self._detector = RetinaFaceDetector(self._detector_weights, device=self.device)
            else:
                raise ValueError(f"detector must be 'mtcnn', 'retinaface' or a Detector object, got {spec!r}")
        return self._detector

    def _autocast(self):
        return precision_autocast(self.device, self.precision)

    @torch.inference_mode()
    def restore_faces(self, crops: Sequence[np.ndarray], ws: Sequence[float],
                      masks: Sequence[np.ndarray] | None = None) -> dict[float, list[np.ndarray]]:
        """Run aligned crops ``(S, S, 3)`` uint8 RGB through the network, ``batch_size`` at a time.

        ``masks``: per crop ``(S, S)`` bool, for the masked (inpainting) inference: the masked
        pixels are painted white for the network and only they take its output; a crop whose mask
        is empty comes back as it is, without a network call. Returns, per weight, the restored
        crops at ``face_size`` in input order.
        """
        if masks is not None and len(masks) != len(crops):
            raise ValueError(f"got {len(masks)} masks for {len(crops)} crops")
        out: dict[float, list[np.ndarray]] = {w: [crop.copy() for crop in crops] for w in ws}
        todo = [k for k in range(len(crops)) if masks is None or masks[k].any()]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            inputs = [crops[k] if masks is None else fill_white(crops[k], masks[k]) for k in chunk]
            for w, faces in self._run_network(inputs, ws).items():
                for k, face in zip(chunk, faces):
                    out[w][k] = face if masks is None else composite(crops[k], face, masks[k])
        return out

    def _run_network(self, crops: Sequence[np.ndarray], ws: Sequence[float]) -> dict[float, list[np.ndarray]]:
        """One network batch: crops ``(S, S, 3)`` uint8 -> per weight, outputs at ``face_size`` (uint8)."""
        chunk = np.stack([_resize(c, self.net_size, self.net_size) for c in crops])
        x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        out: dict[float, list[np.ndarray]] = {}
        for w in ws:
            with self._autocast():
                y = self.model(x, w=w, adain=self.adain)
            y = ((y.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out[w] = [_resize(face, self.face_size, self.face_size) for face in y]
        return out

    def _upscaled(self, image: np.ndarray, upscale: float) -> np.ndarray:
        if upscale == 1:
            return image
        height, width = image.shape[:2]
        size = (max(1, round(width * upscale)), max(1, round(height * upscale)))
        if self.background_upsampler is not None:
            big = np.asarray(self.background_upsampler(image, upscale))
            if big.shape[:2] != (size[1], size[0]) or big.dtype != np.uint8:
                big = cv2.resize(big.astype(np.uint8), size, interpolation=cv2.INTER_CUBIC)
            return big
        return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)

    # ------------------------------------------------------------------ the task
    def fidelities(self, w: float | Sequence[float] | None = None) -> list[float]:
        """The fidelity values to run: ``w`` when given, else the task's published ``w``."""
        return _as_fidelities(self.task.w if w is None else w)

    def task_notes(self, w: float | Sequence[float] | None = None, aligned: bool = False) -> list[str]:
        """What a user should know once per run about the task and the asked ``w`` (an override of
        the published settings, what happens to whole photos); a command prints these once."""
        notes = [override_note(self.task, self.fidelities(w), self.adain)]
        if not aligned:
            notes.append(whole_photo_note(self.task))
        return [note for note in notes if note]

    def _aligned_masks(self, image: np.ndarray, mask: np.ndarray | None, result: RestoreResult) -> None:
        """Inpainting: the crop's mask (given, or the pure-white pixels) at ``face_size``."""
        mask = white_mask(image) if mask is None else checked_mask(mask, image.shape)
        crop_mask = resize_mask(mask, self.face_size)
        if not crop_mask.any():
            result.notes.append("nothing to inpaint: no pure-white pixel (all three channels 255) in the "
                                "face; copied through unchanged (paint the holes white or give a mask)")
        result.masks.append(crop_mask)

    # ------------------------------------------------------------------ whole images
    def prepare(self, image: np.ndarray, w: float | Sequence[float] | None = None, aligned: bool = False,
                mask: np.ndarray | None = None, upscale: float | None = None,
                only_center_face: bool | None = None) -> RestoreResult:
        """First half of :meth:`restore`: detect and align (or take the aligned face); no network yet.

        Lets a caller pool the crops of several images into the network's batches with
        :meth:`complete` while keeping only a few images in memory. ``upscale`` and
        ``only_center_face`` override the restorer's own for this image. Raises
        :class:`~codeformer_lightning.inference.tasks.TaskError` for input the task cannot take.
        """
        _check_rgb(image)
        upscale = self.upscale if upscale is None else upscale
        if upscale <= 0:
            raise ValueError(f"upscale must be positive, got {upscale}")
        centre = self.only_center_face if only_center_face is None else bool(only_center_face)
        result = RestoreResult(ws=self.fidelities(w), aligned=aligned, task=self.task.name, upscale=upscale,
                               only_center_face=centre)
        if mask is not None and not self.task.masked:
            raise TaskError(f"a mask applies to inpainting only; this restorer runs {self.task.name}")
        if not aligned and not self.task.whole_photos:
            raise TaskError(f"{self.task.name} works on aligned faces only (as published: 512x512 crops): the "
                            "holes hide the eyes, nose and mouth that face detection and alignment need. Pass "
                            "aligned faces with aligned=True (codeformer-restore --aligned)")
        if aligned:
            self._take_aligned(image, mask, result)
        else:
            self._detect_and_align(image, result)
        return result

    def _take_aligned(self, image: np.ndarray, mask: np.ndarray | None, result: RestoreResult) -> None:
        """The aligned face is the one crop (resized to ``face_size``), with its mask for inpainting."""
        height, width = image.shape[:2]
        if height != width:
            result.notes.append(f"aligned input is {width}x{height}, not square: stretched to "
                                f"{self.face_size}x{self.face_size}")
        elif height != self.face_size:
            result.notes.append(f"aligned input resized from {width} to {self.face_size} px")
        result.cropped_faces.append(_resize(image, self.face_size, self.face_size))
        if self.task.masked:
            self._aligned_masks(image, mask, result)

    def _detect_and_align(self, image: np.ndarray, result: RestoreResult) -> None:
        faces = self.detector.detect(image)
        faces = center_face(faces, image.shape) if result.only_center_face else faces
        if not faces:
            smallest = getattr(self.detector, "min_face_size", None)
            if smallest is not None and min(image.shape[:2]) < smallest:
                result.notes.append(f"image is {image.shape[1]}x{image.shape[0]} px, smaller than the "
                                    f"smallest detectable face ({smallest} px): no face, copied through")
            else:
                result.notes.append("no face found: copied through")
        result.faces = faces
        result.affines = [estimate_alignment(f.landmarks, self.face_size) for f in faces]
        result.cropped_faces = [warp_face(image, m, self.face_size) for m in result.affines]

    def complete(self, images: Sequence[np.ndarray], prepared: Sequence[RestoreResult]) -> list[RestoreResult]:
        """Second half: restore all crops of ``prepared`` in pooled batches and paste them back
        into their ``images`` (upscaled); fills ``restored_faces`` and ``images`` in place."""
        if len(images) != len(prepared):
            raise ValueError(f"got {len(images)} images for {len(prepared)} prepared results")
        fidelities = list(dict.fromkeys(v for r in prepared for v in r.ws))
        crops = [c for r in prepared for c in r.cropped_faces]
        masks = [m for r in prepared for m in r.masks] if self.task.masked else None
        restored = self.restore_faces(crops, fidelities, masks) if crops else {v: [] for v in fidelities}
        start = 0
        for image, result in zip(images, prepared):
            count = len(result.cropped_faces)
            result.restored_faces = {v: restored[v][start:start + count] for v in result.ws}
            start += count
            if result.aligned:  # the restored face is the result
                result.images = {v: result.restored_faces[v][0] for v in result.ws}
                continue
            background = self._upscaled(image, result.upscale)
            factor = background.shape[1] / image.shape[1]
            affines = [rescale_affine(m, factor) for m in result.affines]
            for v in result.ws:
                pasted = paste_back(background, result.restored_faces[v], affines) if count else background.copy()
                if self.draw_box:
                    pasted = draw_boxes(pasted, result.faces, factor)
                result.images[v] = pasted
        return list(prepared)

    def restore_batch(self, images: Sequence[np.ndarray], w: float | Sequence[float] | None = None,
                      aligned: bool = False, masks: Sequence[np.ndarray | None] | None = None) -> list[RestoreResult]:
        """Restore several images, pooling all their faces into the network's batches (``masks``:
        one per image or None, for inpainting)."""
        masks = [None] * len(images) if masks is None else list(masks)
        if len(masks) != len(images):
            raise ValueError(f"got {len(masks)} masks for {len(images)} images")
        return self.complete(images, [self.prepare(image, w, aligned, mask) for image, mask in zip(images, masks)])

    def restore(self, image: np.ndarray, w: float | Sequence[float] | None = None, aligned: bool = False,
                mask: np.ndarray | None = None) -> RestoreResult:
        """Restore one ``(H, W, 3)`` uint8 RGB image for one or several fidelity values ``w`` in [0, 1]
        (default: the task's, 0.5 for restoration).

        ``aligned=True``: ``image`` is already an FFHQ-aligned face (resized to ``face_size`` if
        needed); no detection, no paste-back. ``mask``: inpainting only, ``(H, W)`` bool or a
        picture, white = fill (default: the image's pure-white pixels).
        """
        return self.restore_batch([image], w, aligned, [mask])[0]

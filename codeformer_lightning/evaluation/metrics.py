"""Face-restoration metrics over folders of images: PSNR, SSIM, LPIPS, FID, identity, landmarks.

Conventions: metric inputs are ``(B, 3, H, W) float32`` RGB in [0, 1]. PSNR/SSIM use torchmetrics
with ``data_range=1``; LPIPS is the project's own VGG16 LPIPS (local weights only); FID is
torchmetrics' ``FrechetInceptionDistance``; identity is the cosine similarity of ArcFace
embeddings; landmarks is the mean 5-point landmark distance between restored and ground truth,
divided by the ground-truth face size.

A metric whose weights (or optional package) are missing is *unavailable*: it is left out of the
numbers and reported with a message naming the file or flag it needs; the other metrics run on.

Library entry points: :func:`evaluate_folders` (paired folders) and :func:`evaluate_model`
(restore a folder of LQ faces at several fidelity values ``w`` and evaluate each).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..io import BadImageError, write_image
from .arcface import ARCFACE_HELP, IResNet, identity_similarity, load_arcface
from .images import load_image, pair_folders, resize_to, to_uint8

#: Every metric this module knows, in table order. Lower is better for lpips, fid, landmarks.
ALL_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "fid", "identity", "landmarks")
#: Metrics computed when none are named: all of them. LPIPS, FID and identity need weight files; without
#: them they are reported as unavailable (with what to provide) and the others are computed.
DEFAULT_METRICS: tuple[str, ...] = ALL_METRICS
#: PSNR of identical images is infinite; it is reported as this many dB instead (JSON has no inf).
#: 100 dB is an MSE of 1e-10 on [0, 1] images: far above any real restoration.
PSNR_CAP = 100.0
#: Set-level metrics: one number per run, no per-image value.
SET_METRICS = ("fid",)
LOWER_IS_BETTER = {"lpips", "fid", "landmarks"}

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"
FID_HELP = (
    "FID needs torch-fidelity's Inception-v3 weights, never downloaded at run time: get "
    f"{FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL}) and pass its path with --fid-weights "
    "(library: fid_weights=..., or fid_feature=<your nn.Module> for a custom feature extractor)."
)
LPIPS_HELP = (
    "LPIPS needs torchvision's VGG16 ImageNet weights vgg16-397923af.pth "
    "(https://download.pytorch.org/models/vgg16-397923af.pth): pass --vgg-weights PATH, or put the file "
    "in the torch hub cache (<torch hub dir>/checkpoints/). Optional LPIPS v0.1 heads: --lpips-heads vgg.pth."
)


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed (weights or package missing); the message says what to provide."""


# ----------------------------------------------------------------------------- per-image metrics
def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 1, H, W)`` ITU-R BT.601 luma in [16/255, 235/255].

    The Y of YCbCr used by MATLAB's ``rgb2ycbcr`` and BasicSR's ``test_y_channel`` option.
    """
    coefficients = images.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return ((images * coefficients).sum(1, keepdim=True) + 16.0) / 255.0


def psnr(restored: torch.Tensor, gt: torch.Tensor, y_channel: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``(B,)`` in dB, at most :data:`PSNR_CAP`.

    ``restored``, ``gt``: ``(B, 3, H, W)`` RGB in [0, 1]. ``y_channel``: on BT.601 luma instead of RGB.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if y_channel:
        restored, gt = rgb_to_y(restored), rgb_to_y(gt)
    value = peak_signal_noise_ratio(
        restored.double(), gt.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return value.nan_to_num(posinf=PSNR_CAP).clamp(max=PSNR_CAP).float()


def ssim(restored: torch.Tensor, gt: torch.Tensor, y_channel: bool = False) -> torch.Tensor:
    """Structural similarity per image, ``(B,)`` in [-1, 1] (1: identical).

    Gaussian window 11 px, sigma 1.5, K = (0.01, 0.03), data range 1 (torchmetrics defaults),
    averaged over channels and positions. ``y_channel``: on BT.601 luma instead of RGB.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if y_channel:
        restored, gt = rgb_to_y(restored), rgb_to_y(gt)
    # float32: double precision makes the Gaussian filtering ~7x slower for no visible change (< 1e-6)
    value = structural_similarity_index_measure(
        restored.float(), gt.float(), data_range=1.0, reduction="none"
    )
    return value.float().reshape(-1)


def _largest_face(faces: Sequence[Any]) -> Any | None:
    """The face with the largest box (or, without boxes, the largest landmark spread)."""
    if not faces:
        return None
    return max(faces, key=_face_size)


def _face_size(face: Any) -> float:
    """sqrt(area) of the face's detection box ``(x1, y1, x2, y2)``; without one, of its landmarks' box."""
    box = getattr(face, "box", None)
    if box is None:
        box = getattr(face, "bbox", None)
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)[:4])
    else:
        pts = np.asarray(face.landmarks, dtype=np.float64).reshape(5, 2)
        (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    return math.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))


def landmark_distance(restored_faces: Sequence[Any], gt_faces: Sequence[Any]) -> float | None:
    """Mean Euclidean distance of the 5 landmarks, divided by the ground-truth face size.

    Each side's largest detected face is used; ``faces`` are objects with ``.landmarks (5, 2)``
    (pixels) and optionally ``.box (x1, y1, x2, y2)``. ``None`` when either side has no face.
    """
    a, b = _largest_face(restored_faces), _largest_face(gt_faces)
    if a is None or b is None:
        return None
    pa = np.asarray(a.landmarks, dtype=np.float64).reshape(5, 2)
    pb = np.asarray(b.landmarks, dtype=np.float64).reshape(5, 2)
    size = _face_size(b)
    if size <= 0:
        return None
    return float(np.linalg.norm(pa - pb, axis=1).mean() / size)


# ----------------------------------------------------------------------------- results
@dataclass
class EvaluationResult:
    """Metrics of one run (one folder pair, or one ``w`` of a model).

    per_image: ``{image name: {metric: value or None}}`` (None: not measurable for that image,
    e.g. no face found). mean: ``{metric: mean over images with a value}``; set metrics (FID) only
    have a mean. unavailable: ``{metric: why, and what to provide}``. failed: ``{image name: error}``
    for images left out. notes: warnings worth reading next to the numbers.
    """

    label: str
    metrics: list[str]
    w: float | None = None
    per_image: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mean: dict[str, float | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "w": self.w,
            "metrics": self.metrics,
            "mean": self.mean,
            "per_image": self.per_image,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- the suite
@dataclass
class EvaluationConfig:
    """What to measure and with which weights.

    metrics: subset of :data:`ALL_METRICS`. vgg_weights / lpips_heads: LPIPS files (see
    :class:`~codeformer_lightning.losses.perceptual.LPIPS`). fid_weights: torch-fidelity Inception
    weights. arcface_weights: arcface_torch IResNet ``backbone.pth``. y_channel: PSNR/SSIM on BT.601
    luma. size_mismatch: ``"resize"`` (restored -> gt size, bicubic, with a warning) or ``"error"``
    (the pair is reported as failed). aligned: the faces are FFHQ-aligned (identity crops them to
    ArcFace's template; otherwise whole images are resized).
    """

    metrics: Sequence[str] = DEFAULT_METRICS
    vgg_weights: str | Path | None = None
    lpips_heads: str | Path | None = None
    fid_weights: str | Path | None = None
    arcface_weights: str | Path | None = None
    y_channel: bool = False
    size_mismatch: Literal["resize", "error"] = "resize"
    aligned: bool = True
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
        if self.size_mismatch not in ("resize", "error"):
            raise ValueError(f"size_mismatch must be 'resize' or 'error', got {self.size_mismatch!r}")
        self.metrics = [m for m in ALL_METRICS if m in self.metrics]  # canonical order, no duplicates


class MetricSuite:
    """Loads every requested metric once, then evaluates any number of runs with :meth:`evaluate`.

    Args:
        config: what to measure, weight paths.
        detector: for ``landmarks``: an object with ``detect((H,W,3) uint8 RGB) -> list of faces``
            (``.landmarks (5,2)``, optionally ``.box``). Default: the project's MTCNN detector.
        fid_feature: a custom FID feature extractor (``(B,3,H,W) uint8 -> (B, F)``) used instead of
            torch-fidelity's Inception.

    ``unavailable`` maps each metric that could not be set up to the reason.
    """

    def __init__(
        self, config: EvaluationConfig, detector: Any = None, fid_feature: nn.Module | None = None
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.unavailable: dict[str, str] = {}
        self.lpips: nn.Module | None = None
        self.arcface: IResNet | None = None
        self.detector: Any = None
        self.fid: Any = None
        wanted = set(config.metrics)
        if "lpips" in wanted:
            self._try("lpips", self._setup_lpips)
        if "fid" in wanted:
            self._try("fid", lambda: self._setup_fid(fid_feature))
        if "identity" in wanted:
            self._try("identity", self._setup_identity)
        if "landmarks" in wanted:
            self._try("landmarks", lambda: self._setup_landmarks(detector))
        for name, why in self.unavailable.items():
            warnings.warn(f"metric {name} unavailable: {why}", stacklevel=2)

    @property
    def metrics(self) -> list[str]:
        """The metrics that will be computed (requested and available), in table order."""
        return [m for m in self.config.metrics if m not in self.unavailable]

    def _try(self, name: str, setup: Callable[[], None]) -> None:
        try:
            setup()
        except MetricUnavailable as exc:
            self.unavailable[name] = str(exc)

    def _setup_lpips(self) -> None:
        from ..losses.perceptual import LPIPS

        vgg = self.config.vgg_weights
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.lpips = LPIPS(vgg, self.config.lpips_heads).to(self.device)
        except FileNotFoundError as exc:
            # the loss's own message speaks of training configs; say what this command needs instead
            what = (
                f"{vgg}: no such file"
                if vgg is not None
                else "no --vgg-weights given and none in the torch hub cache"
            )
            heads = self.config.lpips_heads
            if vgg is not None and Path(vgg).is_file() and heads is not None:
                what = f"{heads}: no such file"
            raise MetricUnavailable(f"{what}. {LPIPS_HELP}") from exc
        except ValueError as exc:  # a file of the wrong kind: LPIPS's message names it and the keys
            raise MetricUnavailable(str(exc)) from exc
        for w in caught:  # the "no linear heads" warning: pass it on once
            warnings.warn(str(w.message), stacklevel=4)

    def _setup_fid(self, fid_feature: nn.Module | None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if fid_feature is not None:
            # uint8 inputs for custom extractors as for Inception (normalize=False): one convention
            self.fid = FrechetInceptionDistance(feature=fid_feature.eval(), normalize=False).to(self.device)
            return
        path = self.config.fid_weights
        if path is None:
            raise MetricUnavailable(f"no --fid-weights given. {FID_HELP}")
        if not Path(path).is_file():
            raise MetricUnavailable(f"{path}: no such file. {FID_HELP}")
        if importlib.util.find_spec("torch_fidelity") is None:
            raise MetricUnavailable(
                "the torch-fidelity package is not installed (pip install torch-fidelity); torchmetrics' "
                f"FID uses its Inception-v3 network with the weights {path}."
            )
        try:
            self.fid = FrechetInceptionDistance(
                feature=2048, normalize=False, feature_extractor_weights_path=str(path)
            ).to(self.device)
        except Exception as exc:  # torch-fidelity raises assorted errors for a wrong file
            raise MetricUnavailable(
                f"{path}: could not be loaded as Inception weights ({type(exc).__name__}: {exc}). {FID_HELP}"
            ) from exc

    def _setup_identity(self) -> None:
        path = self.config.arcface_weights
        if path is None:
            raise MetricUnavailable(f"no --arcface-weights given. {ARCFACE_HELP}")
        try:
            self.arcface = load_arcface(path, self.device)
        except (FileNotFoundError, ValueError) as exc:
            raise MetricUnavailable(str(exc)) from exc

    def _setup_landmarks(self, detector: Any) -> None:
        if detector is None:
            try:
                from ..inference.detection import MTCNNDetector  # written alongside; optional here
            except ImportError as exc:
                raise MetricUnavailable(
                    "the landmark metric needs the MTCNN face detector (codeformer_lightning.inference."
                    f"detection.MTCNNDetector), which could not be imported ({exc})."
                ) from exc
            try:
                detector = MTCNNDetector()
            except Exception as exc:  # missing detector weights or package: a message, not a crash
                raise MetricUnavailable(
                    f"the MTCNN face detector could not be created ({type(exc).__name__}: {exc})"
                ) from exc
        self.detector = detector

    # ------------------------------------------------------------------------- evaluation
    def _pair(self, name: str, restored: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring ``restored`` ``(1,3,h,w)`` to ``gt``'s size per ``size_mismatch``."""
        if restored.shape[-2:] != gt.shape[-2:]:
            got, want = tuple(restored.shape[-2:]), tuple(gt.shape[-2:])
            if self.config.size_mismatch == "error":
                raise BadImageError(name, f"restored image is {got[1]}x{got[0]}, ground truth {want[1]}x{want[0]}")
            warnings.warn(
                f"{name}: restored {got[1]}x{got[0]} resized to ground truth {want[1]}x{want[0]}",
                stacklevel=3,
            )
            restored = resize_to(restored, want)
        return restored, gt

    @torch.inference_mode()
    def _measure(self, restored: torch.Tensor, gt: torch.Tensor) -> dict[str, float | None]:
        """One pair ``(1,3,H,W)`` in [0, 1] -> per-image values; feeds FID's running statistics."""
        y = self.config.y_channel
        wanted = set(self.metrics)
        values: dict[str, float | None] = {}
        if "psnr" in wanted:
            values["psnr"] = float(psnr(restored, gt, y)[0])
        if "ssim" in wanted:
            values["ssim"] = float(ssim(restored, gt, y)[0])
        if self.lpips is not None:
            values["lpips"] = float(
                self.lpips(restored.to(self.device) * 2 - 1, gt.to(self.device) * 2 - 1)[0]
            )
        if self.arcface is not None:
            values["identity"] = float(
                identity_similarity(self.arcface, restored, gt, self.config.aligned)[0]
            )
        if self.detector is not None:
            faces_r = self.detector.detect(to_uint8(restored[0]))
            faces_g = self.detector.detect(to_uint8(gt[0]))
            values["landmarks"] = landmark_distance(faces_r, faces_g)
        if self.fid is not None:
            as_uint8 = (restored.clamp(0, 1) * 255).round().to(torch.uint8)
            self.fid.update(as_uint8.to(self.device), real=False)
            self.fid.update((gt.clamp(0, 1) * 255).round().to(torch.uint8).to(self.device), real=True)
        return values

    def evaluate(
        self,
        pairs: Iterable[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]],
        label: str = "restored",
        w: float | None = None,
    ) -> EvaluationResult:
        """Evaluate one run.

        ``pairs``: ``(name, load)`` where ``load()`` returns ``(restored, gt)`` as ``(1,3,H,W)`` float
        in [0, 1] or raises BadImageError; a failing pair is recorded in ``failed`` and skipped.
        """
        result = EvaluationResult(
            label=label, metrics=list(self.config.metrics), w=w, unavailable=dict(self.unavailable)
        )
        if self.fid is not None:
            self.fid.reset()
        for name, load in pairs:
            try:
                restored, gt = self._pair(name, *load())
            except BadImageError as exc:
                result.failed[name] = str(exc)
                warnings.warn(f"skipped {name}: {exc}", stacklevel=2)
                continue
            values = self._measure(restored, gt)
            result.per_image[name] = {m: values.get(m) for m in self.metrics if m not in SET_METRICS}
        self._summarise(result)
        return result

    def _summarise(self, result: EvaluationResult) -> None:
        for metric in self.metrics:
            if metric in SET_METRICS:
                continue
            vals = [v[metric] for v in result.per_image.values() if v.get(metric) is not None]
            result.mean[metric] = float(np.mean(vals)) if vals else None
            missing = len(result.per_image) - len(vals)
            if missing and metric == "landmarks":
                result.notes.append(
                    f"landmarks: no face found in {missing} of {len(result.per_image)} image pairs (left out of the mean)"
                )
        if self.fid is not None:
            n = len(result.per_image)
            if n < 2:
                result.unavailable["fid"] = f"FID needs at least 2 image pairs, got {n}"
            else:
                result.mean["fid"] = float(self.fid.compute())
                if n < 2048:
                    result.notes.append(
                        f"fid: computed from {n} images; FID is biased upwards for small sets (use >= 2048 when comparing)"
                    )
        # keep table order: metrics with a mean first in ALL_METRICS order
        result.mean = {m: result.mean.get(m) for m in result.metrics if m in result.mean}


# ----------------------------------------------------------------------------- entry points
def _folder_pairs(restored_dir: str | Path, gt_dir: str | Path):
    for name, restored_path, gt_path in pair_folders(restored_dir, gt_dir):

        def load(rp: Path = restored_path, gp: Path = gt_path) -> tuple[torch.Tensor, torch.Tensor]:
            return load_image(rp), load_image(gp)

        yield name, load


def evaluate_folders(
    restored_dir: str | Path,
    gt_dir: str | Path,
    config: EvaluationConfig | None = None,
    *,
    detector: Any = None,
    fid_feature: nn.Module | None = None,
    suite: MetricSuite | None = None,
    label: str = "restored",
) -> EvaluationResult:
    """Evaluate restored images against ground truth, matched by file stem.

    Raises PairingError listing unmatched names. Unreadable images are recorded in
    ``result.failed``; metrics without weights in ``result.unavailable``.
    """
    pairs = list(_folder_pairs(restored_dir, gt_dir))  # pair first: a naming error surfaces before any work
    suite = suite or MetricSuite(config or EvaluationConfig(), detector=detector, fid_feature=fid_feature)
    return suite.evaluate(pairs, label=label)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_model(
    weights: str | Path | nn.Module,
    lq_dir: str | Path,
    gt_dir: str | Path,
    ws: Sequence[float] = (0.0, 0.5, 1.0),
    config: EvaluationConfig | None = None,
    *,
    adain: bool = True,
    batch_size: int = 4,
    save_dir: str | Path | None = None,
    detector: Any = None,
    fid_feature: nn.Module | None = None,
) -> list[EvaluationResult]:
    """Restore the aligned LQ faces in ``lq_dir`` at each fidelity weight ``w``, evaluate each run.

    ``weights``: a CodeFormer weight file (read by ``load_pretrained``) or a CodeFormer module.
    LQ images are resized to the network's ``img_size`` when they differ (with a warning).
    ``save_dir``: also write the restored PNGs to ``save_dir/w_<w>/<name>.png``.
    Returns one :class:`EvaluationResult` per ``w``, labelled ``w=<w>``.
    """
    from ..checkpoints import load_pretrained
    from ..nn import CodeFormer

    config = config or EvaluationConfig()
    model = load_pretrained(weights) if isinstance(weights, (str, Path)) else weights
    if not isinstance(model, CodeFormer):
        raise ValueError(
            f"{weights}: holds a {type(model).__name__}, expected a CodeFormer restoration network"
        )
    device = torch.device(config.device)
    model = model.to(device).eval()
    pairs = pair_folders(lq_dir, gt_dir)
    suite = MetricSuite(config, detector=detector, fid_feature=fid_feature)
    results = []
    for w in ws:
        out_dir = Path(save_dir) / f"w_{w:g}" if save_dir is not None else None
        pairs_at_w = _restored_pairs(model, pairs, float(w), adain, batch_size, device, out_dir)
        results.append(suite.evaluate(pairs_at_w, label=f"w={w:g}", w=float(w)))
    return results


def _restored_pairs(
    model: nn.Module,
    pairs: Sequence[tuple[str, Path, Path]],
    w: float,
    adain: bool,
    batch_size: int,
    device: torch.device,
    out_dir: Path | None,
) -> Iterable[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]]:
    """Restore ``(name, lq_path, gt_path)`` in batches, lazily: ``(name, load)`` as :meth:`MetricSuite.evaluate` takes.

    Only one batch of restored images is held at a time, so memory does not grow with the folder.
    """
    size = int(model.config["img_size"])
    for batch in _batches(pairs, batch_size):
        restored: dict[str, torch.Tensor | BadImageError] = {}
        names, tensors = [], []
        for name, lq_path, _ in batch:
            try:
                lq = load_image(lq_path)
            except BadImageError as exc:
                restored[name] = exc
                continue
            if lq.shape[-2:] != (size, size):
                warnings.warn(
                    f"{lq_path}: {lq.shape[-1]}x{lq.shape[-2]} resized to the network's {size}x{size}",
                    stacklevel=2,
                )
                lq = resize_to(lq, (size, size))
            names.append(name)
            tensors.append(lq)
        if tensors:
            with torch.inference_mode():
                x = torch.cat(tensors).to(device) * 2 - 1
                out = ((model(x, w=w, adain=adain) + 1) / 2).clamp(0, 1).float().cpu()
            for name, image in zip(names, out):
                # round to 8 bits: the numbers are those of the PNG a user would save and re-evaluate
                restored[name] = (image[None] * 255).round() / 255
                if out_dir is not None:
                    write_image(out_dir / f"{name}.png", to_uint8(image))
        for name, _, gt_path in batch:
            yield name, lambda r=restored[name], g=gt_path: _restored_and_gt(r, g)


def _restored_and_gt(
    restored: torch.Tensor | BadImageError, gt_path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(restored, BadImageError):
        raise restored
    return restored, load_image(gt_path)

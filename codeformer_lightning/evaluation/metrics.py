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

Inpainting: pairs that come with a mask (the pixels the network filled) also get PSNR and SSIM
inside the mask only (:data:`MASKED_METRICS`): outside it an inpainting output equals its input,
so the whole-image numbers mostly measure the untouched pixels. ``evaluate_model`` follows the
weights' variant (:mod:`codeformer_lightning.inference.tasks`): its published ``w`` and AdaIN and,
for inpainting, the published mask (the LQ's pure-white pixels) and composite.
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

from ..inference.tasks import MaskSource, Task, TaskError, composite_tensor, override_note, task_of_model
from ..io import BadImageError, write_image
from .arcface import ARCFACE_HELP, IResNet, identity_similarity, load_arcface
from .images import load_image, pair_folders, resize_to, restored_runs, to_uint8

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
#: Inside-the-mask versions of these metrics, reported for pairs that come with an inpainting mask.
MASKED_METRICS = {"psnr": "psnr_mask", "ssim": "ssim_mask"}

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
    "in the torch hub cache (<torch hub dir>/checkpoints/). The LPIPS v0.1 linear heads ship with the package (--lpips-heads PATH: others)."
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


def masked_psnr(restored: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, y_channel: bool = False) -> torch.Tensor:
    """PSNR over the pixels where ``mask`` ``(B, 1, H, W)`` bool is set, ``(B,)`` in dB (at most
    :data:`PSNR_CAP`; NaN for an empty mask). Images as for :func:`psnr`."""
    if y_channel:
        restored, gt = rgb_to_y(restored), rgb_to_y(gt)
    weight = mask.to(torch.float64).expand_as(restored)
    squared = (restored.double() - gt.double()).pow(2) * weight
    mse = squared.sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))
    return (10 * torch.log10(1.0 / mse)).nan_to_num(posinf=PSNR_CAP, nan=float("nan")).clamp(max=PSNR_CAP).float()


def masked_ssim(restored: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, y_channel: bool = False) -> torch.Tensor:
    """SSIM averaged over the pixels where ``mask`` ``(B, 1, H, W)`` bool is set, ``(B,)`` (NaN for an
    empty mask): the same local SSIM map as :func:`ssim`, whose plain mean is the whole-image value."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if y_channel:
        restored, gt = rgb_to_y(restored), rgb_to_y(gt)
    _, local = structural_similarity_index_measure(
        restored.float(), gt.float(), data_range=1.0, reduction="none", return_full_image=True
    )
    weight = mask.to(local.dtype).expand_as(local)
    return ((local * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))).float()


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
    def _pair(self, name: str, restored: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Bring ``restored`` ``(1,3,h,w)`` (and its ``mask`` ``(1,1,h,w)``) to ``gt``'s size per ``size_mismatch``."""
        if mask is not None and mask.shape[-2:] != restored.shape[-2:]:
            raise BadImageError(name, f"mask is {mask.shape[-1]}x{mask.shape[-2]}, the restored image "
                                      f"{restored.shape[-1]}x{restored.shape[-2]}")
        if restored.shape[-2:] != gt.shape[-2:]:
            got, want = tuple(restored.shape[-2:]), tuple(gt.shape[-2:])
            if self.config.size_mismatch == "error":
                raise BadImageError(name, f"restored image is {got[1]}x{got[0]}, ground truth {want[1]}x{want[0]}")
            warnings.warn(
                f"{name}: restored {got[1]}x{got[0]} resized to ground truth {want[1]}x{want[0]}",
                stacklevel=3,
            )
            restored = resize_to(restored, want)
            if mask is not None:
                mask = torch.nn.functional.interpolate(mask.float(), size=want, mode="nearest").bool()
        return restored, gt, mask

    @torch.inference_mode()
    def _measure(self, restored: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> dict[str, float | None]:
        """One pair ``(1,3,H,W)`` in [0, 1] (``mask`` ``(1,1,H,W)`` bool: also the inside-the-mask
        metrics) -> per-image values; feeds FID's running statistics."""
        y = self.config.y_channel
        wanted = set(self.metrics)
        values: dict[str, float | None] = {}
        if "psnr" in wanted:
            values["psnr"] = float(psnr(restored, gt, y)[0])
        if "ssim" in wanted:
            values["ssim"] = float(ssim(restored, gt, y)[0])
        if mask is not None:
            inside = {"psnr": masked_psnr, "ssim": masked_ssim}
            for metric, name in MASKED_METRICS.items():
                if metric in wanted:
                    value = float(inside[metric](restored, gt, mask, y)[0])
                    values[name] = None if math.isnan(value) else value
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
        in [0, 1], or ``(restored, gt, mask)`` with an inpainting ``mask`` ``(1,1,H,W)`` bool (then also
        :data:`MASKED_METRICS`), or raises BadImageError; a failing pair is recorded in ``failed``
        and skipped.
        """
        result = EvaluationResult(
            label=label, metrics=list(self.config.metrics), w=w, unavailable=dict(self.unavailable)
        )
        if self.fid is not None:
            self.fid.reset()
        masked = [MASKED_METRICS[m] for m in self.metrics if m in MASKED_METRICS]
        for name, load in pairs:
            try:
                restored, gt, mask = self._pair(name, *load())
            except BadImageError as exc:
                result.failed[name] = str(exc)
                warnings.warn(f"skipped {name}: {exc}", stacklevel=2)
                continue
            values = self._measure(restored, gt, mask)
            if mask is not None:
                result.metrics += [m for m in masked if m not in result.metrics]
            reported = self.metrics + [m for m in masked if m in result.metrics]
            result.per_image[name] = {m: values.get(m) for m in reported if m not in SET_METRICS}
        self._summarise(result)
        return result

    def _summarise(self, result: EvaluationResult) -> None:
        masked = [m for m in MASKED_METRICS.values() if m in result.metrics]
        for metric in self.metrics + masked:
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
        # keep table order: metrics with a mean first in ALL_METRICS order, the inside-the-mask ones last
        result.mean = {m: result.mean.get(m) for m in result.metrics if m in result.mean}


# ----------------------------------------------------------------------------- entry points
def _folder_pairs(restored_dir: str | Path, gt_dir: str | Path, masks: MaskSource | None = None):
    return _loaded_pairs(pair_folders(restored_dir, gt_dir), masks)


def _loaded_pairs(pairs: Iterable[tuple[str, Path, Path]], masks: MaskSource | None = None):
    for name, restored_path, gt_path in pairs:

        def load(rp: Path = restored_path, gp: Path = gt_path) -> tuple[torch.Tensor, ...]:
            restored, gt = load_image(rp), load_image(gp)
            if masks is None:
                return restored, gt
            # matched by the ground truth's name: restored names may carry codeformer-restore's w tag
            return restored, gt, _mask_tensor(masks, gp, restored.shape[-2:])

        yield name, load


def _mask_tensor(masks: MaskSource, source: Path, size: Sequence[int]) -> torch.Tensor:
    """The mask of ``source`` as ``(1, 1, H, W)`` bool; a missing or unfit mask fails only this pair."""
    try:
        return torch.from_numpy(masks.mask_for(source, (int(size[0]), int(size[1]))))[None, None]
    except TaskError as exc:
        raise BadImageError(source, str(exc)) from None


def evaluate_folders(
    restored_dir: str | Path,
    gt_dir: str | Path,
    config: EvaluationConfig | None = None,
    *,
    masks: str | Path | None = None,
    detector: Any = None,
    fid_feature: nn.Module | None = None,
    suite: MetricSuite | None = None,
    label: str = "restored",
) -> EvaluationResult:
    """Evaluate restored images against ground truth, matched by file stem.

    ``masks``: inpainting masks (a file for every image, or a folder matched by stem; white = the
    filled pixels): the pairs then also get :data:`MASKED_METRICS`. Raises PairingError listing
    unmatched names. Unreadable images are recorded in ``result.failed``; metrics without weights
    in ``result.unavailable``.
    """
    source = MaskSource(masks) if masks is not None else None
    pairs = list(_folder_pairs(restored_dir, gt_dir, source))  # pair first: a naming error surfaces before any work
    suite = suite or MetricSuite(config or EvaluationConfig(), detector=detector, fid_feature=fid_feature)
    return suite.evaluate(pairs, label=label)


def evaluate_restored(
    restored_dir: str | Path,
    gt_dir: str | Path,
    config: EvaluationConfig | None = None,
    *,
    suffix: str = "",
    masks: str | Path | None = None,
    detector: Any = None,
    fid_feature: nn.Module | None = None,
) -> list[EvaluationResult]:
    """Evaluate a folder of restored images, or ``codeformer-restore``'s output, against ground truth:
    one :class:`EvaluationResult` per fidelity weight found in the names (labelled ``w=<w>``), or one
    (``restored``) for images named as the ground truth. See
    :func:`~codeformer_lightning.evaluation.images.restored_runs` for the layouts and ``suffix``.
    """
    source = MaskSource(masks) if masks is not None else None
    runs = restored_runs(restored_dir, gt_dir, suffix)  # pair first: a naming error surfaces before any work
    suite = MetricSuite(config or EvaluationConfig(), detector=detector, fid_feature=fid_feature)
    return [
        suite.evaluate(_loaded_pairs(pairs, source), label="restored" if w is None else f"w={w:g}", w=w)
        for w, pairs in runs
    ]


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_model(
    weights: str | Path | nn.Module,
    lq_dir: str | Path,
    gt_dir: str | Path,
    ws: Sequence[float] | None = None,
    config: EvaluationConfig | None = None,
    *,
    adain: bool | None = None,
    task: str | None = None,
    masks: str | Path | None = None,
    batch_size: int = 4,
    save_dir: str | Path | None = None,
    detector: Any = None,
    fid_feature: nn.Module | None = None,
) -> list[EvaluationResult]:
    """Restore the aligned LQ faces in ``lq_dir`` at each fidelity weight ``w``, evaluate each run.

    ``weights``: a CodeFormer weight file (read by ``load_pretrained``) or a CodeFormer module. The
    published inference of the weights' variant is applied (``task`` overrides): ``ws`` defaults to
    its ``w`` (restoration 0.5, colorization 0, inpainting 1) and ``adain`` to its AdaIN. Inpainting
    fills the LQ's pure-white pixels (or ``masks``: a file or a folder matched by stem, white =
    fill), keeps the other pixels and also reports PSNR/SSIM inside the mask.
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
    run = _TaskRun(model, task_of_model(model, task), adain, masks, torch.device(config.device))
    ws = [run.task.w] if ws is None else [float(w) for w in ws]
    note = override_note(run.task, ws, run.adain)
    pairs = pair_folders(lq_dir, gt_dir)
    suite = MetricSuite(config, detector=detector, fid_feature=fid_feature)
    results = []
    for w in ws:
        out_dir = Path(save_dir) / f"w_{w:g}" if save_dir is not None else None
        pairs_at_w = _restored_pairs(run, pairs, w, batch_size, out_dir)
        results.append(suite.evaluate(pairs_at_w, label=f"w={w:g}", w=w))
        if run.task.name != "restoration" or note:
            results[-1].notes += [f"task {run.task.describe()}"] + ([note] if note else [])
    return results


class _TaskRun:
    """The network with its task's settings: ``(1,3,H,W)`` LQ faces in [0, 1] -> restored in [0, 1]."""

    def __init__(self, model: nn.Module, task: Task, adain: bool | None, masks: str | Path | None,
                 device: torch.device) -> None:
        if masks is not None and not task.masked:
            raise ValueError(f"masks apply to inpainting; the task is {task.name}")
        self.model = model.to(device).eval()
        self.task = task
        self.adain = task.adain if adain is None else bool(adain)
        self.masks = MaskSource(masks) if masks is not None else None
        self.device = device
        self.size = int(model.config["img_size"])

    def load(self, lq_path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LQ face at the network's size and, for inpainting, its mask ``(1,1,S,S)`` bool."""
        lq = load_image(lq_path)
        mask = None
        if self.task.masked:
            mask = _mask_tensor(self.masks, lq_path, lq.shape[-2:]) if self.masks else (lq == 1).all(1, keepdim=True)
        if lq.shape[-2:] != (self.size, self.size):
            warnings.warn(
                f"{lq_path}: {lq.shape[-1]}x{lq.shape[-2]} resized to the network's {self.size}x{self.size}",
                stacklevel=3,
            )
            lq = resize_to(lq, (self.size, self.size))
            if mask is not None:
                mask = torch.nn.functional.interpolate(mask.float(), size=(self.size, self.size)).bool()
        return lq, mask

    @torch.inference_mode()
    def restore(self, lq: torch.Tensor, masks: torch.Tensor | None, w: float) -> torch.Tensor:
        """``lq`` ``(B,3,S,S)`` in [0, 1] -> restored in [0, 1], rounded to 8 bits (the PNG a user saves)."""
        x = lq.to(self.device) * 2 - 1
        if masks is not None:  # holes painted white for the network, only they take its output
            masks = masks.to(self.device)
            x = composite_tensor(x, torch.ones_like(x), masks)
        out = self.model(x, w=w, adain=self.adain)
        if masks is not None:
            out = composite_tensor(x, out, masks)
        restored = ((out + 1) / 2).clamp(0, 1).float().cpu()
        return (restored * 255).round() / 255


def _restored_pairs(
    run: _TaskRun,
    pairs: Sequence[tuple[str, Path, Path]],
    w: float,
    batch_size: int,
    out_dir: Path | None,
) -> Iterable[tuple[str, Callable[[], tuple[torch.Tensor, ...]]]]:
    """Restore ``(name, lq_path, gt_path)`` in batches, lazily: ``(name, load)`` as :meth:`MetricSuite.evaluate` takes.

    Only one batch of restored images is held at a time, so memory does not grow with the folder.
    """
    for batch in _batches(pairs, batch_size):
        restored: dict[str, tuple | BadImageError] = {}
        names, tensors, masks = [], [], []
        for name, lq_path, _ in batch:
            try:
                lq, mask = run.load(lq_path)
            except BadImageError as exc:
                restored[name] = exc
                continue
            names.append(name)
            tensors.append(lq)
            masks.append(mask)
        if tensors:
            stacked = torch.cat(masks) if run.task.masked else None
            out = run.restore(torch.cat(tensors), stacked, w)
            for name, image, mask in zip(names, out, masks):
                restored[name] = (image[None], mask)
                if out_dir is not None:
                    write_image(out_dir / f"{name}.png", to_uint8(image))
        for name, _, gt_path in batch:
            yield name, lambda r=restored[name], g=gt_path: _restored_and_gt(r, g)


def _restored_and_gt(restored: tuple | BadImageError, gt_path: Path) -> tuple[torch.Tensor, ...]:
    if isinstance(restored, BadImageError):
        raise restored
    image, mask = restored
    return (image, load_image(gt_path)) if mask is None else (image, load_image(gt_path), mask)

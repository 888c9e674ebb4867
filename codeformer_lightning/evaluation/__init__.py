"""Evaluation of restored faces: PSNR, SSIM, LPIPS, FID, ArcFace identity, landmark distance.

* :func:`evaluate_folders` / :func:`evaluate_restored` (codeformer-restore's output, per w) /
  :func:`evaluate_model`: library entry points (see :mod:`.metrics`).
* :func:`write_report`: markdown/CSV/JSON tables and the fidelity-quality plot.
* ``codeformer-evaluate``: :func:`codeformer_lightning.evaluation.cli.main`.
"""

from .arcface import IResNet, load_arcface
from .images import PairingError, load_image, pair_folders, restored_runs
from .metrics import (
    ALL_METRICS,
    PSNR_CAP,
    EvaluationConfig,
    EvaluationResult,
    MetricSuite,
    MetricUnavailable,
    evaluate_folders,
    evaluate_model,
    evaluate_restored,
    landmark_distance,
    psnr,
    ssim,
)
from .report import plot_over_w, write_report

__all__ = [
    "ALL_METRICS",
    "PSNR_CAP",
    "EvaluationConfig",
    "EvaluationResult",
    "IResNet",
    "MetricSuite",
    "MetricUnavailable",
    "PairingError",
    "evaluate_folders",
    "evaluate_model",
    "evaluate_restored",
    "landmark_distance",
    "load_arcface",
    "load_image",
    "pair_folders",
    "restored_runs",
    "plot_over_w",
    "psnr",
    "ssim",
    "write_report",
]

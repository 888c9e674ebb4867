"""Send sample grids and code histograms to whichever Lightning loggers are configured.

Weights & Biases gets an image panel (``log_image``) and a histogram, TensorBoard ``add_image`` /
``add_histogram_raw``, and any other logger with a ``log_dir`` (CSVLogger) a PNG under
``<log_dir>/images/``. Without loggers these functions do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger

from ..io import write_image

LoggerArg = Logger | Sequence[Logger] | None | bool


def _loggers(logger: LoggerArg) -> list[Logger]:
    if logger is None or isinstance(logger, bool):
        return []
    if isinstance(logger, Logger):
        return [logger]
    return [lg for lg in logger if isinstance(lg, Logger)]


def image_grid(images: Sequence[torch.Tensor], max_rows: int = 8) -> torch.Tensor:
    """Side-by-side grid: one row per sample, one column per tensor in ``images``.

    ``images``: tensors ``(B, 3, H, W)`` in [-1, 1] (same B, H, W; values are clamped) -> ``(3,
    rows*H, len(images)*W)`` float in [0, 1] on the CPU.
    """
    if not images:
        raise ValueError("image_grid needs at least one batch of images")
    rows = min(max_rows, *(im.shape[0] for im in images))
    cols = torch.stack([im[:rows].detach().float().cpu().clamp(-1, 1) for im in images])  # (n, R, 3, H, W)
    return rearrange((cols + 1) / 2, "n r c h w -> c (r h) (n w)")


def _to_uint8_hwc(grid: torch.Tensor) -> np.ndarray:
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def log_image_grid(
    logger: LoggerArg,
    key: str,
    images: Sequence[torch.Tensor],
    step: int,
    caption: str | None = None,
    max_rows: int = 8,
) -> torch.Tensor:
    """Log ``images`` (list of ``(B,3,H,W)`` in [-1,1], e.g. ``[input, reconstruction]``) as one grid.

    ``logger``: a Lightning logger, a list of them (``trainer.loggers``), or None/False. Call it on
    rank 0 only. Returns the grid ``(3, H', W')`` in [0, 1].
    """
    grid = image_grid(images, max_rows)
    for lg in _loggers(logger):
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[_to_uint8_hwc(grid)], step=step, caption=[caption] if caption else None)
        elif isinstance(lg, TensorBoardLogger):
            lg.experiment.add_image(key, grid, global_step=step)
        elif getattr(lg, "log_dir", None):
            out = Path(lg.log_dir) / "images" / f"{key.replace('/', '_')}_step{step:07d}.png"
            write_image(out, _to_uint8_hwc(grid))
    return grid


def log_code_histogram(logger: LoggerArg, key: str, counts: torch.Tensor, step: int) -> None:
    """Log a codebook usage histogram ``counts`` ``(K,)`` (how often each code was chosen).

    W&B: a bar histogram over code indices; TensorBoard: the same as a raw histogram. Other loggers
    are skipped (log scalars such as perplexity for them).
    """
    counts = counts.detach().float().cpu()
    k = counts.numel()
    for lg in _loggers(logger):
        if isinstance(lg, WandbLogger):
            import wandb

            edges = np.arange(k + 1, dtype=np.float64)
            lg.experiment.log({key: wandb.Histogram(np_histogram=(counts.numpy(), edges)), "trainer/global_step": step})
        elif isinstance(lg, TensorBoardLogger):
            idx = torch.arange(k, dtype=torch.float64)
            c = counts.double()
            lg.experiment.add_histogram_raw(
                key, min=0.0, max=float(k - 1), num=int(c.sum()), sum=float((idx * c).sum()),
                sum_squares=float((idx * idx * c).sum()), bucket_limits=(idx + 1).tolist(),
                bucket_counts=c.tolist(), global_step=step,
            )

"""Training utilities shared by the stage modules (no Hydra)."""

from .ema import EMA

__all__ = ["EMA"]

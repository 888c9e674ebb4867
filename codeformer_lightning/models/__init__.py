"""Lightning modules of the three training stages (networks come from ``codeformer_lightning.nn``)."""

from .vqgan import VQGANModule

__all__ = ["VQGANModule"]

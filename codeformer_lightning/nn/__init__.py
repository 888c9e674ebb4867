"""Pure ``torch.nn`` networks of CodeFormer (no Lightning, no Hydra).

>>> from codeformer_lightning.nn import CodeFormer
>>> model = CodeFormer()                 # the published architecture, 512 px
>>> restored = model(images, w=0.5)      # (B,3,512,512) in [-1,1] -> same, clamped
"""

from .autoencoder import Encoder, Generator, VQAutoEncoder
from .blocks import AttnBlock, Downsample, ResBlock, Upsample
from .codeformer import (
    DEFAULT_ADAIN,
    DEFAULT_W,
    CodeFormer,
    CodeFormerOutput,
    FusionBlock,
    adaptive_instance_norm,
    fidelity_weight,
)
from .discriminator import PatchDiscriminator
from .quantizer import QuantizerOutput, VectorQuantizer, code_statistics
from .transformer import SelfAttention, TransformerLayer

__all__ = [
    "AttnBlock", "CodeFormer", "CodeFormerOutput", "Downsample", "Encoder", "FusionBlock", "Generator",
    "PatchDiscriminator", "QuantizerOutput", "ResBlock", "SelfAttention", "TransformerLayer", "Upsample",
    "VQAutoEncoder", "VectorQuantizer", "adaptive_instance_norm", "code_statistics", "DEFAULT_W", "DEFAULT_ADAIN",
    "fidelity_weight",
]

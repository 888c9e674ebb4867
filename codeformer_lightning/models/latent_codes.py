"""Target codes of clean faces for stages II and III: computed on the fly or written to a file.

Stages II and III learn to predict, from a degraded face, the codebook indices that the frozen
stage I encoder + quantizer assign to the clean face. :class:`CodeTargetEncoder` computes them
during training; ``codeformer-latent-codes`` precomputes them once for a training folder (the
original and the horizontally flipped image of every face, since the data pipeline flips at
random), which saves the HQ encoder's forward pass at every step:

    codeformer-latent-codes --autoencoder weights/vqgan.safetensors --images data/ffhq_512 \\
        --out weights/latent_codes.pth

The file uses the published layout (``latent_gt_code1024.pth``), described and read by
:mod:`codeformer_lightning.data.latent_codes` (reading the file is a data concern; computing it
needs the encoder, which is why this half lives here).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError, load_pretrained
from ..data.datasets import BadImageWarning, image_to_tensor, list_image_files, read_face
from ..data.latent_codes import LatentCodes, read_latent_codes, save_latent_codes
from ..io import BadImageError
from ..nn import CodeFormer, VQAutoEncoder


class CodeTargetEncoder(nn.Module):
    """Frozen copy of a stage I encoder + quantizer: clean image -> its code indices.

    ``forward(gt)``: ``(B, 3, S, S)`` in [-1, 1] -> ``(B, s*s)`` long. Always in eval mode, no
    trainable parameters; it never changes during training (its weights are still saved in the
    training checkpoint, so a resumed run uses the same targets).
    """

    def __init__(self, autoencoder: VQAutoEncoder) -> None:
        super().__init__()
        if isinstance(autoencoder, CodeFormer):
            raise TypeError(
                "CodeTargetEncoder needs the stage I autoencoder (a VQAutoEncoder): a CodeFormer's encoder is "
                "the trained LQ encoder, not the clean-image encoder that defines the target codes"
            )
        self.img_size = autoencoder.img_size
        # the architecture, so that a training checkpoint can rebuild this encoder without the weight file
        self.autoencoder_config = dict(autoencoder.config)
        self.encoder = copy.deepcopy(autoencoder.encoder)
        self.quantize = copy.deepcopy(autoencoder.quantize)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CodeTargetEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, gt: torch.Tensor) -> torch.Tensor:
        if gt.ndim != 4 or gt.shape[1] != 3 or gt.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"target codes need clean images (B, 3, {self.img_size}, {self.img_size}), got {tuple(gt.shape)}"
            )
        z, _ = self.encoder(gt)
        return self.quantize(z).indices


# ----------------------------------------------------------------------------- the latent-code file
def _batches(paths: Sequence[Path], batch_size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(paths), batch_size):
        yield paths[i : i + batch_size]


def _read_good(paths: Sequence[Path], size: int) -> tuple[list[torch.Tensor], list[Path]]:
    # The data pipeline never delivers a file that does not decode, so it needs no codes: skip it, named.
    images, good = [], []
    for p in paths:
        try:
            # the pixels stages II/III train on: decoded and resized as the data pipeline does
            images.append(image_to_tensor(read_face(p, size)))
            good.append(p)
        except BadImageError as exc:
            warnings.warn(f"{exc}; no codes written for it", BadImageWarning, stacklevel=3)
    return images, good


@torch.no_grad()
def compute_latent_codes(
    autoencoder: VQAutoEncoder,
    paths: Sequence[Path],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> LatentCodes:
    """``{"orig": {stem: (L,)}, "hflip": {stem: (L,)}}`` for the images at ``paths``.

    Codes of the flipped image are computed from the flipped pixels (not by flipping the code
    map: the encoder is not flip-equivariant).
    """
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"image names must be unique (the file is keyed by name): duplicates {dupes[:5]}")
    targets = CodeTargetEncoder(autoencoder).to(device)
    out: LatentCodes = {"orig": {}, "hflip": {}}
    for chunk in _batches(list(paths), batch_size):
        images, chunk = _read_good(chunk, autoencoder.img_size)
        if not chunk:
            continue
        x = torch.stack(images).to(device)
        for key, images in (("orig", x), ("hflip", x.flip(-1))):
            codes = targets(images).cpu()
            for p, c in zip(chunk, codes):
                out[key][p.stem] = c.clone()
    return out


def write_latent_codes(
    autoencoder: str | Path | VQAutoEncoder,
    images: str | Path,
    out: str | Path,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> Path:
    """Encode every image under ``images`` (and its mirror image) with a stage I autoencoder.

    ``autoencoder``: a VQAutoEncoder or its weight file (our ``.safetensors`` or the published
    ``vqgan_code1024.pth``). Writes the published layout (module docstring) to ``out``.
    """
    if not isinstance(autoencoder, nn.Module):
        autoencoder = load_pretrained(autoencoder)
    if type(autoencoder) is not VQAutoEncoder:
        raise ValueError(
            f"latent codes come from a stage I autoencoder (VQAutoEncoder), got a {type(autoencoder).__name__}"
        )
    codes = compute_latent_codes(autoencoder, list_image_files(images), batch_size, device)
    return save_latent_codes(codes, out)


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``codeformer-latent-codes``."""
    parser = argparse.ArgumentParser(
        prog="codeformer-latent-codes",
        description="Write the stage I codes of every training face (original and mirrored) to a file that "
        "stages II/III read instead of running the clean-image encoder at every step.",
    )
    parser.add_argument("--autoencoder", required=True, help="stage I weights (.safetensors or vqgan_code1024.pth)")
    parser.add_argument("--images", required=True, help="folder of aligned training faces")
    parser.add_argument("--out", required=True, help="file to write (e.g. latent_codes.pth)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        out = write_latent_codes(args.autoencoder, args.images, args.out, args.batch_size, args.device)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        parser.exit(2, f"error: {exc}\n")
    n = len(read_latent_codes(out)["orig"])
    print(f"wrote codes of {n} images (original and flipped) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

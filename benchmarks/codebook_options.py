"""Codebook usage and reconstruction with and without the codebook options of stage I.

A small fixed experiment: the tiny stage I config (32 px, latent 4x4), the quickstart faces that ship
with scikit-image, the same seed, data and number of steps for every variant. Prints, per variant, the
fraction of codes used and the perplexity on the held-out faces, dead codes, and reconstruction PSNR
of the EMA autoencoder on the held-out faces.

    python benchmarks/codebook_options.py --steps 400 --codebook-size 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from codeformer_lightning.losses import VQGANLoss
from codeformer_lightning.models import VQGANModule
from codeformer_lightning.nn import VQAutoEncoder
from codeformer_lightning.nn.quantizer import code_statistics
from codeformer_lightning.quickstart import build_face_folder

VARIANTS: dict[str, dict] = {
    "published (none)": {},
    "k-means init": dict(kmeans_init=True),
    "k-means + dead-code restart": dict(kmeans_init=True, dead_code_steps=20),
    "k-means + restart + EMA codebook": dict(kmeans_init=True, dead_code_steps=20, codebook_ema_decay=0.99),
    "k-means + restart + cosine codes": dict(kmeans_init=True, dead_code_steps=20, l2_normalize=True),
}


def _folder_tensor(folder: Path) -> torch.Tensor:
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _batches(images: torch.Tensor, batch_size: int) -> DataLoader:
    # TensorDataset batches are tuples; the module takes the first element as the clean image.
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)


def run_variant(options: dict, train: torch.Tensor, val: torch.Tensor, steps: int, codebook_size: int) -> dict[str, float]:
    pl.seed_everything(0, workers=True)
    l2 = options.pop("l2_normalize", False)
    net = VQAutoEncoder(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), res_blocks=1, attn_resolutions=(4,),
                        codebook_size=codebook_size, emb_dim=32, norm_groups=8, l2_normalize=l2)
    module = VQGANModule(
        net, None, VQGANLoss(perceptual_weight=0.0),
        optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.99)), ema_decay=0.99, **options,
    )
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, _batches(train, 16))
    seconds = time.perf_counter() - start
    ae = module.ema.module.eval()
    with torch.no_grad():
        recon, q = ae(val)
        train_counts = torch.bincount(ae(train)[1].indices.flatten(), minlength=codebook_size).float()
    counts = torch.bincount(q.indices.flatten(), minlength=codebook_size).float()
    perplexity, usage = code_statistics(counts)
    _, train_usage = code_statistics(train_counts)
    mse = torch.mean(((recon.clamp(-1, 1) - val) / 2) ** 2)
    return {
        "train usage": float(train_usage), "val usage": float(usage), "val perplexity": float(perplexity),
        "dead (train)": int((train_counts == 0).sum()), "val PSNR dB": float(10 * torch.log10(1 / mse)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--codebook-size", type=int, default=128)
    parser.add_argument("--data", default=None, help="quickstart face folder (default: a temporary one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.data or tempfile.mkdtemp()) / "faces"
    build_face_folder(root, size=32)
    train, val = _folder_tensor(root / "train"), _folder_tensor(root / "val")
    print(f"{len(train)} training faces, {len(val)} held-out faces, 32 px, {args.steps} steps, "
          f"{args.codebook_size} codes, latent 4x4")
    rows = {name: run_variant(dict(opts), train, val, args.steps, args.codebook_size) for name, opts in VARIANTS.items()}
    cols = list(next(iter(rows.values())))
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()

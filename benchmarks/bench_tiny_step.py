"""Forward + backward time of the tiny test configurations on CPU (the unit the test suite pays).

    python benchmarks/bench_tiny_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from codeformer_lightning.nn import CodeFormer, VQAutoEncoder

CONFIGS = {
    "VQAutoEncoder 32px nf16 K64": (VQAutoEncoder, dict(img_size=32, nf=16, ch_mult=(1, 2, 2, 4), attn_resolutions=(4,),
                                                        codebook_size=64, emb_dim=32, norm_groups=8), 32),
    "VQAutoEncoder 64px nf32 K128": (VQAutoEncoder, dict(img_size=64, nf=32, ch_mult=(1, 2, 2, 4), attn_resolutions=(8,),
                                                         codebook_size=128, emb_dim=64, norm_groups=8), 64),
    "CodeFormer 64px nf32 K128 w=1": (CodeFormer, dict(img_size=64, nf=32, ch_mult=(1, 2, 2, 4), attn_resolutions=(8,),
                                                       codebook_size=128, emb_dim=64, norm_groups=8, dim_embd=128,
                                                       n_head=4, n_layers=2, fusion_resolutions=(16, 32)), 64),
}


def main(batch: int = 4, iters: int = 10) -> None:
    print(f"threads={torch.get_num_threads()} batch={batch}")
    for name, (cls, cfg, size) in CONFIGS.items():
        torch.manual_seed(0)
        model = cls(**cfg)
        x = torch.rand(batch, 3, size, size) * 2 - 1

        def step(model=model, x=x):
            if isinstance(model, CodeFormer):
                out = model.restore(x, w=1.0, adain=False)  # a stage III training step (no AdaIN)
                loss = out.image.abs().mean() + out.logits.logsumexp(-1).mean()
            else:
                recon, q = model(x)
                loss = (recon - x).abs().mean() + q.loss
            loss.backward()

        step()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(f"  {name:32s} forward+backward {statistics.median(times) * 1000:7.1f} ms (median of {iters})")


if __name__ == "__main__":
    main()

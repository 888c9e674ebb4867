"""Time per image pair of each evaluation metric, as a ratio to PSNR+SSIM measured in the same run.

Random smooth images and random weights in the published layouts (VGG16 for LPIPS, ArcFace
IResNet for identity): the speed is that of the real networks, the values mean nothing.

    python benchmarks/bench_evaluation.py                 # 2 pairs at 256 px on CPU (about a minute)
    python benchmarks/bench_evaluation.py --device cuda --pairs 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from codeformer_lightning.evaluation import EvaluationConfig, IResNet, MetricSuite, evaluate_folders
from codeformer_lightning.evaluation.arcface import IRESNET_LAYERS
from codeformer_lightning.losses.perceptual import VGG16_CONVS


def _write_pairs(root: Path, n: int, size: int) -> None:
    g = torch.Generator().manual_seed(0)
    for folder in ("gt", "restored"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        x = torch.nn.functional.interpolate(
            torch.rand(2, 3, size // 16, size // 16, generator=g), size=size, mode="bicubic"
        )
        imgs = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        Image.fromarray(imgs[0]).save(root / "gt" / f"{i:04d}.png")
        Image.fromarray(imgs[1]).save(root / "restored" / f"{i:04d}.png")


def _write_weights(root: Path, depth: int) -> tuple[Path, Path]:
    vgg = {}
    for idx, cin, cout in VGG16_CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3) * (2.0 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(cout)
    torch.save(vgg, root / "vgg16-397923af.pth")
    torch.save(IResNet(IRESNET_LAYERS[depth]).state_dict(), root / "backbone.pth")
    return root / "vgg16-397923af.pth", root / "backbone.pth"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--size", type=int, default=256, help="512: the published geometry (slow on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--arcface-depth", type=int, choices=sorted(IRESNET_LAYERS), default=50)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_pairs(root, args.pairs, args.size)
        vgg, arcface = _write_weights(root, args.arcface_depth)
        setups = {
            "psnr+ssim (baseline)": ["psnr", "ssim"],
            "lpips": ["lpips"],
            f"identity (r{args.arcface_depth})": ["identity"],
            "landmarks (MTCNN)": ["landmarks"],
            "all but fid": ["psnr", "ssim", "lpips", "identity", "landmarks"],
        }
        base = None
        print(f"{args.pairs} pairs of {args.size}x{args.size} on {args.device}")
        print(f"{'metrics':<24}{'ms / pair':>12}{'x baseline':>12}")
        for label, metrics in setups.items():
            config = EvaluationConfig(
                metrics=metrics, vgg_weights=vgg, arcface_weights=arcface, device=args.device
            )
            suite = MetricSuite(config)
            if suite.unavailable:
                print(f"{label:<24}  unavailable: {next(iter(suite.unavailable.values()))[:80]}")
                continue
            evaluate_folders(root / "restored", root / "gt", suite=suite)  # warm-up (imports, kernels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            evaluate_folders(root / "restored", root / "gt", suite=suite)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.pairs * 1000
            base = base or ms
            print(f"{label:<24}{ms:>12.1f}{ms / base:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

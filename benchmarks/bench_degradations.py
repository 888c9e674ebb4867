"""Degraded training pairs per second per CPU core at 512 px: ours vs a straightforward baseline.

The baseline is the loop of the published (basicsr-style) data pipeline written plainly in this
file: float32 image in [0, 1], ``cv2.filter2D`` with the full 41x41 kernel, ``cv2.resize`` down,
numpy Gaussian noise, a ``cv2`` JPEG round trip from float, ``cv2.resize`` back, colour jitter /
grayscale, HWC -> CHW tensor in [-1, 1]. Ours is ``degradations.degrade`` + the same tensor
conversion. Both start from the same decoded uint8 image (decoding is excluded) and run
interleaved, one thread each (``torch``, ``cv2`` and BLAS), same parameter ranges.

Also times the torch batch path (``gpu_degradations.degrade_batch``) -- on CPU here unless
``--device cuda`` -- per pair.

    python benchmarks/bench_degradations.py                 # ~1 minute
    python benchmarks/bench_degradations.py --pairs 100 --device cuda
    python benchmarks/bench_degradations.py --profile --presets stage3_small   # time per step and route
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads BLAS
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from codeformer_lightning.data import degradations as D  # noqa: E402
from codeformer_lightning.data.gpu_degradations import degrade_batch  # noqa: E402


# ----------------------------------------------------------------------------- the baseline
def baseline_kernel(rs: np.random.RandomState, cfg: D.DegradationConfig) -> np.ndarray:
    """A bivariate Gaussian from a meshgrid, as the published code builds it."""
    size = cfg.kernel_size
    lo, hi = cfg.blur_sigma
    if rs.uniform() < cfg.anisotropic_prob:
        sx, sy, theta = rs.uniform(lo, hi), rs.uniform(lo, hi), rs.uniform(-math.pi, math.pi)
    else:
        sx = sy = rs.uniform(lo, hi)
        theta = 0.0
    d = np.diag([sx**2, sy**2])
    u = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(u @ d @ u.T)
    ax = np.arange(-(size // 2), size // 2 + 1)
    xx, yy = np.meshgrid(ax, ax)
    grid = np.stack([xx, yy], -1)
    k = np.exp(-0.5 * np.sum((grid @ inv) * grid, -1))
    return k / k.sum()


def baseline_degrade(img_u8: np.ndarray, cfg: D.DegradationConfig, rs: np.random.RandomState) -> torch.Tensor:
    h, w = img_u8.shape[:2]
    img = img_u8.astype(np.float32) / 255.0
    if cfg.blur:
        img = cv2.filter2D(img, -1, baseline_kernel(rs, cfg))
    if cfg.downsample:
        scale = rs.uniform(*cfg.downsample_range)
        img = cv2.resize(img, (int(w // scale), int(h // scale)), interpolation=cv2.INTER_LINEAR)
    if cfg.noise:
        sigma = rs.uniform(*cfg.noise_range) / 255.0
        img = np.clip(img + np.float32(rs.randn(*img.shape)) * sigma, 0, 1)
    if cfg.jpeg:
        q = int(rs.uniform(*cfg.jpeg_range))
        _, enc = cv2.imencode(".jpg", img * 255.0, [int(cv2.IMWRITE_JPEG_QUALITY), q])
        img = np.float32(cv2.imdecode(enc, 1)) / 255.0
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    if cfg.color_jitter_prob and rs.uniform() < cfg.color_jitter_prob:
        img = np.clip(
            img + rs.uniform(-cfg.color_jitter_shift, cfg.color_jitter_shift, 3).astype(np.float32) / 255,
            0,
            1,
        )
    if cfg.gray_prob and rs.uniform() < cfg.gray_prob:
        img = np.tile(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None], (1, 1, 3))
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) * 2 - 1


def ours_degrade(img_u8: np.ndarray, cfg: D.DegradationConfig, rng: np.random.Generator) -> torch.Tensor:
    lq, _ = D.degrade(img_u8, cfg, rng)
    return torch.from_numpy(lq).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- per-step profile
class _StepTimer:
    """Accumulates wall time per named step."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.ms[name] = self.ms.get(name, 0.0) + 1000 * (time.perf_counter() - start)
        self.count[name] = self.count.get(name, 0) + 1
        return out


def _chosen_route(img: np.ndarray, params: D.DegradationParams) -> tuple[str, np.ndarray, object]:
    kernel = D.crop_kernel(params.kernel, D.SVD_TOLERANCE / 2)
    terms = D.separable_terms(kernel, D.SVD_TOLERANCE / 2)
    out_size = params.out_size or img.shape[:2]
    costs = D._route_costs(img.shape[:2], out_size, kernel.shape[0], terms)
    return min(costs, key=costs.get), kernel, terms


def profile_ours(img: np.ndarray, cfg: D.DegradationConfig, pairs: int, seed: int = 0) -> _StepTimer:
    """``degrade`` split into its steps (same draws, same calls), blur + downsample per route."""
    t, rng = _StepTimer(), np.random.default_rng(seed)
    h, w = img.shape[:2]
    for _ in range(pairs):
        p = t("sample params", D.sample_params, cfg, rng, (h, w))
        out_size = p.out_size or (h, w)
        if p.kernel is not None:
            route, kernel, terms = t("crop + SVD + route", _chosen_route, img, p)
            low = t(
                f"blur+down [{route}, {p.kernel_kind}]", D._blur_by_route, img, kernel, terms, out_size, route
            )
        else:
            low = t("downsample", D.blur_and_downsample, img, None, p.out_size)
        if p.noise_sigma > 0:
            low += t("noise", D.gaussian_noise, low.shape, p.noise_sigma, rng)
        out = t("round to uint8", lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8), low)
        if p.jpeg_quality is not None:
            out = t("JPEG", D.jpeg_round_trip, out, p.jpeg_quality)
        if out.shape[:2] != (h, w):
            out = t("upsample", cv2.resize, out.astype(np.float32), (w, h), None, 0, 0, cv2.INTER_LINEAR)
        if p.changes_colors:
            out = t("colour changes", D._change_colors, out.astype(np.float32), p)
        out = t("final rounding", D._to_uint8, out)
        t("to tensor", lambda x: torch.from_numpy(x).permute(2, 0, 1).float().div_(127.5).sub_(1.0), out)
    return t


def profile_baseline(img: np.ndarray, cfg: D.DegradationConfig, pairs: int, seed: int = 0) -> _StepTimer:
    """``baseline_degrade`` split into its steps (same draws, same calls)."""
    t, rs = _StepTimer(), np.random.RandomState(seed)
    h, w = img.shape[:2]
    for _ in range(pairs):
        x = t("to float", lambda a: a.astype(np.float32) / 255.0, img)
        if cfg.blur:
            x = t("blur (41x41 filter2D)", cv2.filter2D, x, -1, t("kernel", baseline_kernel, rs, cfg))
        if cfg.downsample:
            scale = rs.uniform(*cfg.downsample_range)
            x = t(
                "downsample", cv2.resize, x, (int(w // scale), int(h // scale)), None, 0, 0, cv2.INTER_LINEAR
            )
        if cfg.noise:
            sigma = rs.uniform(*cfg.noise_range) / 255.0
            x = t("noise", lambda a, s=sigma: np.clip(a + np.float32(rs.randn(*a.shape)) * s, 0, 1), x)
        if cfg.jpeg:
            q = int(rs.uniform(*cfg.jpeg_range))

            def jpeg(a, q=q):
                _, enc = cv2.imencode(".jpg", a * 255.0, [int(cv2.IMWRITE_JPEG_QUALITY), q])
                return np.float32(cv2.imdecode(enc, 1)) / 255.0

            x = t("JPEG", jpeg, x)
        if x.shape[:2] != (h, w):
            x = t("upsample", cv2.resize, x, (w, h), None, 0, 0, cv2.INTER_LINEAR)
        if cfg.color_jitter_prob and rs.uniform() < cfg.color_jitter_prob:
            shift = rs.uniform(-cfg.color_jitter_shift, cfg.color_jitter_shift, 3).astype(np.float32) / 255
            x = t("colour shift", lambda a, s=shift: np.clip(a + s, 0, 1), x)
        if cfg.gray_prob and rs.uniform() < cfg.gray_prob:
            x = t("gray", lambda a: np.tile(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY)[:, :, None], (1, 1, 3)), x)
        t("to tensor", lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) * 2 - 1, x)
    return t


def print_profile(name: str, img: np.ndarray, cfg: D.DegradationConfig, pairs: int) -> None:
    for label, timer in (
        ("baseline", profile_baseline(img, cfg, pairs)),
        ("ours", profile_ours(img, cfg, pairs)),
    ):
        total = sum(timer.ms.values())
        print(f"  {name} {label}: {total / pairs:.2f} ms/pair")
        for step, ms in sorted(timer.ms.items(), key=lambda kv: -kv[1]):
            n = timer.count[step]
            print(f"    {step:<34}{ms / pairs:>7.2f} ms/pair {n:>5d} calls {ms / n:>7.2f} ms/call")


# ----------------------------------------------------------------------------- timing
def face_image(size: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut, bundled: no download) at ``size`` px."""
    from skimage import data

    return cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def pairs_per_second(fn, img, cfg, make_rng, pairs: int) -> float:
    rng = make_rng()
    start = time.perf_counter()
    for _ in range(pairs):
        fn(img, cfg, rng)
    return pairs / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=40, help="pairs per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--presets", nargs="+", default=["stage2", "stage3_small", "stage3_large"])
    parser.add_argument("--batch", type=int, default=8, help="batch size of the torch path")
    parser.add_argument("--device", default="cpu", help="device of the torch batch path")
    parser.add_argument("--profile", action="store_true", help="also print the time of every step and route")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    img = face_image(args.size)
    print(f"{args.size} px, one thread, {args.pairs} pairs x {args.rounds} rounds per preset (median)")
    print(f"{'preset':<14}{'baseline /s':>12}{'ours /s':>10}{'ratio':>8}")
    for name in args.presets:
        cfg = D.preset(name)
        for fn, mk in (
            (baseline_degrade, lambda: np.random.RandomState(0)),
            (ours_degrade, lambda: np.random.default_rng(0)),
        ):
            fn(img, cfg, mk())  # warm-up
        base, ours = [], []
        for r in range(args.rounds):
            base.append(
                pairs_per_second(baseline_degrade, img, cfg, lambda r=r: np.random.RandomState(r), args.pairs)
            )
            ours.append(
                pairs_per_second(ours_degrade, img, cfg, lambda r=r: np.random.default_rng(r), args.pairs)
            )
        b, o = statistics.median(base), statistics.median(ours)
        print(f"{name:<14}{b:>12.1f}{o:>10.1f}{o / b:>7.2f}x")
    if args.profile:
        print(f"per step, {args.pairs * args.rounds} pairs per preset:")
        for name in args.presets:
            print_profile(name, img, D.preset(name), args.pairs * args.rounds)

    device = torch.device(args.device)
    x = (
        torch.from_numpy(np.stack([img] * args.batch))
        .permute(0, 3, 1, 2)
        .float()
        .div(127.5)
        .sub(1)
        .to(device)
    )
    print(f"torch batch path on {device} (batch {args.batch}, {torch.get_num_threads()} thread(s) on CPU):")
    for name in args.presets:
        gen = torch.Generator(device=device).manual_seed(0)
        degrade_batch(x, name, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rounds = max(1, args.rounds)
        for _ in range(rounds):
            degrade_batch(x, name, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_pair = (time.perf_counter() - start) / (rounds * args.batch)
        print(f"{name:<14}{1 / per_pair:>10.1f} pairs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

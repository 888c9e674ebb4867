"""Time a 512x512 CodeFormer restoration forward and compare with a straightforward baseline.

The baseline is ``tests/reference_impl.py``: the published architecture written the published way
(flat block lists, bmm attention, nn.MultiheadAttention, one-hot codebook lookup) run under
``torch.no_grad``. Both models hold the same random weights in the published layout. Measurements
are interleaved (baseline, ours, baseline, ...) so that machine load hits both alike.

    python benchmarks/bench_restoration.py                       # CPU, batch 1 and 8
    python benchmarks/bench_restoration.py --device cuda         # + bf16, channels_last, torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_impl import RefCodeFormer  # noqa: E402

from codeformer_lightning.checkpoints import published_to_native  # noqa: E402
from codeformer_lightning.nn import CodeFormer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_cpu_peak() -> int:
    """Reset the process's peak-RSS mark (Linux) and return the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _variants(device: torch.device, ref: torch.nn.Module, ours: CodeFormer, compile_: bool):
    def baseline(x):
        with torch.no_grad():
            return ref(x, w=0.5, adain=True)[0]

    def fp32(x):
        with torch.inference_mode():
            return ours(x, w=0.5, adain=True)

    def channels_last(x):
        with torch.inference_mode():
            return ours_cl(x.contiguous(memory_format=torch.channels_last), w=0.5, adain=True)

    ours_cl = CodeFormer().to(device).eval().to(memory_format=torch.channels_last)
    ours_cl.load_state_dict(ours.state_dict())
    out = {"baseline (published-style, no_grad)": baseline, "ours fp32 (inference_mode, SDPA)": fp32,
           "ours fp32 channels_last": channels_last}
    if device.type == "cuda":
        def bf16(x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return ours(x, w=0.5, adain=True)

        out["ours bf16 autocast"] = bf16
        if compile_:
            compiled = torch.compile(ours)

            def comp(x):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(x, w=0.5, adain=True)

            out["ours bf16 + torch.compile"] = comp
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ref = RefCodeFormer().to(device).eval()
    with torch.no_grad():
        ref.position_emb.normal_()
    ours = CodeFormer().to(device).eval()
    ours.load_state_dict(published_to_native(ref.state_dict(), ours))
    variants = _variants(device, ref, ours, not args.no_compile)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    for bs in args.batch_sizes:
        x = torch.rand(bs, 3, 512, 512, device=device) * 2 - 1
        times: dict[str, list[float]] = {k: [] for k in variants}
        peaks: dict[str, float] = {}
        for name, fn in variants.items():  # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rss0 = _reset_cpu_peak()
            fn(x)
            _sync(device)
            peaks[name] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                           else (_status_kib("VmHWM") - rss0) / 1024)
        for _ in range(args.iters):
            for name, fn in variants.items():
                _sync(device)
                t = time.perf_counter()
                fn(x)
                _sync(device)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times[next(iter(variants))])
        print(f"\nbatch {bs}:")
        print(f"  {'variant':40s} {'s/batch':>9s} {'faces/s':>8s} {'speed-up':>8s} {'peak MiB':>9s}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:40s} {med:9.3f} {bs / med:8.2f} {base / med:7.2f}x {peaks[name]:9.0f}")
        if device.type != "cuda":
            print("  peak MiB on CPU: peak resident memory above the resident memory before the call")


if __name__ == "__main__":
    main()

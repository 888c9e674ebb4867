"""512 px CodeFormer restoration forward against the published-style baseline and the matmul limit.

Variants (same random weights in all, loaded through the published key layout):

* ``baseline``: ``tests/reference_impl.py``, the published computation written the published way
  (flat block lists, bmm attention, ``nn.MultiheadAttention``, one-hot code lookup), ``torch.no_grad``;
* ``ours plain``: our networks on their plain torch path (what training, export and GPUs run; on CPU
  also what inference ran before the fused path), forced with ``torch.enable_grad`` and frozen weights;
* ``ours fused``: ``torch.inference_mode`` on CPU takes the fused oneDNN path (``nn/fused.py``);
* ``ours fused + heap``: the same after ``retain_freed_cpu_memory()`` (what ``FaceRestorer`` sets on
  CPU): freed activations stay in the heap instead of being unmapped and zeroed afresh by the kernel.
  The allocator setting cannot be undone in a process, so these runs come last, after every other
  variant at every batch size.

The hardware limit is a 2048x2048 fp32 matmul (MKL) with the same threads, timed right before and
right after every forward: each forward's throughput is divided by the mean of its two neighbours, so
that the ratio stays meaningful on a machine shared with other jobs. Throughput is *effective*: the
published computation's FLOPs (torch's flop counter on the baseline, ~808 GFLOP per face) over the
time. The fused path executes fewer (its upsampling convolutions do 4/9 of the multiply-adds); that
count is printed too. Each cell is the median over ``--repeats`` interleaved runs.

    python benchmarks/bench_restoration.py                        # CPU, batch 1 and 8 (~15 min on 2 idle cores)
    python benchmarks/bench_restoration.py --batch-sizes 1 --repeats 5 --threads 1
    python benchmarks/bench_restoration.py --device cuda          # fp32 vs bf16 + channels_last (+ torch.compile)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_impl import RefCodeFormer  # noqa: E402

from codeformer_lightning.checkpoints import published_to_native  # noqa: E402
from codeformer_lightning.nn import CodeFormer, fused  # noqa: E402

MATMUL_N = 2048


@register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
def _fused_conv_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of oneDNN's fused convolution: ``default(X, W, B, padding, ...)`` or ``binary(X, other, W, ...)``."""
    w_shape = args[0] if isinstance(args[2], list) else args[1]
    return 2 * int(torch.Size(out_shape).numel()) * int(w_shape[1] * w_shape[2] * w_shape[3])


# ----------------------------------------------------------------------------- measurements
def machine_line() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def bench_device(name: str, threads: int | None) -> torch.device | None:
    """The device a benchmark runs on, with ``threads`` torch CPU threads when given; None (after
    printing why) when CUDA is asked for and absent, so that the GPU suite can run anywhere."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return None
    if threads:
        torch.set_num_threads(threads)
    return device


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Matmul:
    """fp32 ``MATMUL_N``-square matmul throughput on ``device`` (GFLOPS), into a preallocated output."""

    def __init__(self, device: torch.device, reps: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(MATMUL_N, MATMUL_N, generator=g).to(device)
        self.b = torch.randn(MATMUL_N, MATMUL_N, generator=g).to(device)
        self.c = torch.empty_like(self.a)
        self.device, self.reps = device, reps
        self.seen: list[float] = []
        self()  # warm-up

    def __call__(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(self.reps):
            torch.mm(self.a, self.b, out=self.c)
        _sync(self.device)
        gflops = self.reps * 2 * MATMUL_N**3 / (time.perf_counter() - t) / 1e9
        self.seen.append(gflops)
        return gflops


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux) and return the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def run_once(fn: Callable[[torch.Tensor], object], x: torch.Tensor, matmul: Matmul) -> dict[str, float]:
    """One forward between two matmul measurements: seconds, matmul GFLOPS, peak memory, page faults."""
    device = x.device
    before = matmul()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _reset_peak_rss()
    use0 = resource.getrusage(resource.RUSAGE_SELF)
    _sync(device)
    t = time.perf_counter()
    fn(x)
    _sync(device)
    seconds = time.perf_counter() - t
    use1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (_status_kib("VmHWM") - rss0) / 1024)
    after = matmul()
    return dict(seconds=seconds, matmul=(before + after) / 2, peak_mib=peak,
                faults=use1.ru_minflt - use0.ru_minflt, sys_s=use1.ru_stime - use0.ru_stime)


# ----------------------------------------------------------------------------- models and variants
def build_models(device: torch.device) -> tuple[RefCodeFormer, CodeFormer]:
    torch.manual_seed(0)
    ref = RefCodeFormer().eval()
    with torch.no_grad():
        ref.position_emb.normal_()
    ours = CodeFormer().eval()
    ours.load_state_dict(published_to_native(ref.state_dict(), ours))
    return ref.to(device), ours.to(device).requires_grad_(False)


def nominal_flops(ref: RefCodeFormer) -> int:
    """FLOPs of one published-computation forward of one 512 px face (torch's flop counter)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ref(torch.zeros(1, 3, 512, 512, device=next(ref.parameters()).device), w=0.5, adain=True)
    return counter.get_total_flops()


def executed_flops(ours: CodeFormer) -> int:
    """FLOPs the fused CPU path executes for one face (counted with the fused kernels' formula)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ours(torch.zeros(1, 3, 512, 512), w=0.5, adain=True)
    return counter.get_total_flops()


def cpu_variants(ref: RefCodeFormer, ours: CodeFormer) -> dict[str, Callable]:
    def baseline(x):
        with torch.no_grad():
            return ref(x, w=0.5, adain=True)[0].clamp(-1, 1)

    def plain(x):
        with torch.enable_grad():  # frozen weights: no graph is built, the plain path runs
            return ours(x, w=0.5, adain=True)

    def fused_path(x):
        with torch.inference_mode():
            return ours(x, w=0.5, adain=True)

    return {"baseline (published-style)": baseline, "ours plain": plain, "ours fused": fused_path}


def cuda_variants(ref: RefCodeFormer, ours: CodeFormer, compile_: str) -> dict[str, Callable]:
    """``compile_``: "no" (eager variants), "yes" (eager and compiled), "only" (baseline and compiled)."""
    torch.backends.cudnn.benchmark = True
    ours_cl = CodeFormer().cuda().eval().requires_grad_(False).to(memory_format=torch.channels_last)
    ours_cl.load_state_dict(ours.state_dict())

    def baseline(x):
        with torch.no_grad():
            return ref(x, w=0.5, adain=True)[0].clamp(-1, 1)

    def fp32(x):
        with torch.inference_mode():
            return ours(x, w=0.5, adain=True)

    def bf16_cl(x):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return ours_cl(x.contiguous(memory_format=torch.channels_last), w=0.5, adain=True)

    out = {"baseline (published-style) fp32": baseline, "ours fp32": fp32, "ours bf16 channels_last": bf16_cl}
    if compile_ == "only":
        out = {"baseline (published-style) fp32": baseline}
    if compile_ != "no":
        compiled = torch.compile(ours_cl)

        def bf16_compiled(x):
            x = x.contiguous(memory_format=torch.channels_last)
            torch._dynamo.maybe_mark_dynamic(x, 0)  # one graph for every batch size
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(x, w=0.5, adain=True)

        out["ours bf16 channels_last compiled"] = bf16_compiled
    return out


# ----------------------------------------------------------------------------- report
def report(bs: int, results: dict[str, list[dict]], flops_per_face: int, matmul: Matmul) -> None:
    base = statistics.median(r["seconds"] for r in next(iter(results.values())))
    mm = [r["matmul"] for runs in results.values() for r in runs]
    print(f"\nbatch {bs} (median of {len(next(iter(results.values())))} runs; matmul {MATMUL_N}^2 fp32: "
          f"median {statistics.median(mm):.0f}, max {max(matmul.seen):.0f} GFLOPS)")
    print("| variant | s/batch | faces/s | eff. GFLOPS | % of matmul | vs baseline | peak MiB | page faults | sys s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        sec = statistics.median(r["seconds"] for r in runs)
        eff = flops_per_face * bs / sec / 1e9
        ratio = statistics.median(flops_per_face * bs / r["seconds"] / 1e9 / r["matmul"] for r in runs)
        print(f"| {name} | {sec:.2f} | {bs / sec:.2f} | {eff:.0f} | {100 * ratio:.0f}% | {base / sec:.2f}x | "
              f"{statistics.median(r['peak_mib'] for r in runs):.0f} | {statistics.median(r['faults'] for r in runs):.0f} | "
              f"{statistics.median(r['sys_s'] for r in runs):.2f} |")


def measure(variants: dict[str, Callable], x: torch.Tensor, repeats: int, matmul: Matmul) -> dict[str, list[dict]]:
    for fn in variants.values():  # warm-up: oneDNN primitives, packed weights, heap
        fn(x)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(repeats):  # interleaved, so that load changes hit every variant alike
        for name, fn in variants.items():
            r = run_once(fn, x, matmul)
            results[name].append(r)
            print(f"  batch {x.shape[0]} run {i}: {name} {r['seconds']:.2f} s, matmul {r['matmul']:.0f} GFLOPS",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--plain-at-all-sizes", action="store_true",
                        help="also time 'ours plain' above batch 1 (skipped by default to save time)")
    parser.add_argument("--compile", choices=["yes", "no", "only"], default="yes",
                        help="CUDA: with the torch.compile variant, without it, or only it (and the baseline)")
    args = parser.parse_args()
    device = bench_device(args.device, args.threads)
    if device is None:
        return
    print(f"# 512 px restoration forward, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"device={device}: {torch.cuda.get_device_name() if device.type == 'cuda' else machine_line()}")
    print(f"load average before: {load_average()}")
    ref, ours = build_models(device)
    flops = nominal_flops(ref)
    print(f"published computation: {flops / 1e9:.1f} GFLOP per face (torch flop counter)")
    matmul = Matmul(device)
    inputs = {bs: torch.rand(bs, 3, 512, 512, generator=torch.Generator().manual_seed(bs)).mul(2).sub(1).to(device)
              for bs in args.batch_sizes}
    if device.type == "cuda":
        variants = cuda_variants(ref, ours, args.compile)
        for bs, x in inputs.items():
            report(bs, measure(variants, x, args.repeats, matmul), flops, matmul)
    else:
        print(f"ours fused path executes: {executed_flops(ours) / 1e9:.1f} GFLOP per face")
        all_results: dict[int, dict[str, list[dict]]] = {}
        for bs, x in inputs.items():
            variants = cpu_variants(ref, ours)
            if bs > 1 and not args.plain_at_all_sizes:
                variants.pop("ours plain")
            all_results[bs] = measure(variants, x, args.repeats, matmul)
        applied = fused.retain_freed_cpu_memory()  # process-wide and irreversible: last
        for bs, x in inputs.items():
            heap = {"ours fused + heap": cpu_variants(ref, ours)["ours fused"]}
            all_results[bs].update(measure(heap, x, args.repeats, matmul) if applied else {})
            report(bs, all_results[bs], flops, matmul)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()

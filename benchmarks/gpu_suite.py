"""Every GPU measurement of issue 16 in one run (< 8 minutes on one GPU), ending in a markdown table.

Sections, each a subprocess with its own time limit (a section that runs out is reported as such and
the suite goes on):

1. forward: ``bench_restoration.py --device cuda`` at batch 1, 4, 16: published-style fp32 eager,
   ours fp32 eager, ours bf16 + channels_last; then, as its own section (compiling may take long),
   the same compiled (``torch.compile``, one graph for every batch size); faces/s and peak memory;
2. training: ``bench_train_step.py --device cuda`` at batch 1, 4, 16: published-style fp32 step,
   ours fp32 eager, ours bf16 + channels_last; then, as its own section, ours bf16 + channels_last
   with the encoder and generator compiled at batch 16; samples/s and peak memory;
3. video: ``bench_video.py`` batched restoration on the GPU (bf16) against one face at a time;
4. degradations: ``bench_degradations.py --device cuda``: the torch batch path's pairs/s against
   the CPU pipeline's pairs/s per core (times the machine's cores = all CPU workers);
5. quickstart: ``codeformer-train experiment=quickstart trainer=gpu`` (shortened with
   ``trainer.max_steps``), which trains stages I-III on the GPU and writes the grid and metrics.

Without a CUDA device every section reports "no CUDA, skipped" after checking that the benchmark
scripts import and their CUDA options parse, so the suite can be checked on any machine:

    python benchmarks/gpu_suite.py                  # on the GPU machine
    python benchmarks/gpu_suite.py --sections forward training
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


@dataclass
class Section:
    name: str
    command: list[str]
    limit_s: int
    summary: str  # a regular expression: the output lines worth repeating in the summary


SECTIONS = [
    Section("forward", [PY, str(HERE / "bench_restoration.py"), "--device", "cuda", "--batch-sizes", "1", "4", "16",
                        "--repeats", "5", "--compile", "no"], 60, r"^\||^batch"),
    Section("forward compiled", [PY, str(HERE / "bench_restoration.py"), "--device", "cuda", "--batch-sizes", "1", "4",
                                 "16", "--repeats", "5", "--compile", "only"], 75, r"^\||^batch"),
    Section("training", [PY, str(HERE / "bench_train_step.py"), "--device", "cuda", "--batch-sizes", "1", "4", "16",
                         "--repeats", "3", "--compile", "no"], 100, r"^\||^batch"),
    Section("training compiled", [PY, str(HERE / "bench_train_step.py"), "--device", "cuda", "--batch-sizes", "16",
                                  "--repeats", "3", "--compile", "only"], 90, r"^\||^batch"),
    Section("video", [PY, str(HERE / "bench_video.py"), "--device", "cuda", "--precision", "bf16", "--frames", "8",
                      "--faces-per-frame", "2", "--batch-size", "16", "--threads", str(os.cpu_count() or 1)],
            45, r"frames/s|speed-up"),
    Section("degradations", [PY, str(HERE / "bench_degradations.py"), "--device", "cuda", "--batch", "32",
                             "--pairs", "20", "--rounds", "2"], 35, r"pairs/s|/s\s+ours|x$"),
    Section("quickstart", ["codeformer-train", "experiment=quickstart", "trainer=gpu", "trainer.max_steps=150"],
            70, r"(?i)psnr|metrics|grid|error"),
]

# run on a machine without CUDA: every script must import and take its CUDA options (``--help``
# last: argparse reads everything before it, prints the usage and stops); the quickstart's config
# must compose with ``trainer=gpu`` (``--cfg job`` prints it without training)
CHECKS = {s.name: s.command for s in SECTIONS[:4]}  # these print "no CUDA device: skipped"
CHECKS.update(video=SECTIONS[4].command + ["--help"], degradations=SECTIONS[5].command + ["--help"],
              quickstart=SECTIONS[6].command + ["--cfg", "job"])


def run(cmd: list[str], limit_s: float) -> tuple[str, str, float]:
    """Run ``cmd`` for at most ``limit_s`` seconds: (status, output, seconds)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"time limit ({limit_s:.0f} s)"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    except FileNotFoundError as e:
        status, out = "not found", str(e)
    return status, out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=[s.name for s in SECTIONS],
                        choices=[s.name for s in SECTIONS])
    parser.add_argument("--total-limit", type=float, default=470.0, help="seconds for all sections together")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"# GPU suite, {datetime.datetime.now():%Y-%m-%d %H:%M}, {device}, torch {torch.__version__}\n")
    rows, deadline = [], time.perf_counter() + args.total_limit
    for section in (s for s in SECTIONS if s.name in args.sections):
        if not cuda:
            status, out, seconds = run(CHECKS[section.name], 120)
            ok = status == "ok"
            rows.append((section.name, "no CUDA, skipped" + ("" if ok else f" (check failed: {status})"), seconds,
                         "scripts import, CUDA options parse" if ok else out.strip().splitlines()[-1:]))
            continue
        limit = min(section.limit_s, deadline - time.perf_counter())
        if limit < 10:
            rows.append((section.name, "skipped: suite time used up", 0.0, ""))
            continue
        status, out, seconds = run(section.command, limit)
        print(f"## {section.name} ({status}, {seconds:.0f} s)\n$ {' '.join(section.command)}\n{out.rstrip()}\n")
        picked = [line.strip() for line in out.splitlines() if re.search(section.summary, line)]
        rows.append((section.name, status, seconds, "<br>".join(picked[-12:])))
    print("| section | status | seconds | figures |")
    print("|---|---|---:|---|")
    for name, status, seconds, figures in rows:
        figures = figures if isinstance(figures, str) else " ".join(figures)
        print(f"| {name} | {status} | {seconds:.0f} | {figures.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

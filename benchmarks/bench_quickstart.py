"""Wall and CPU time of the README's main job, ``codeformer-train experiment=quickstart``, against its
5-minute budget on 2 CPU cores, with the machine's load measured alongside.

The run is the command a new user types, in a fresh temporary folder (the faces are built too; no
download). Printed: wall time and its ratio to the 300 s budget, the CPU time (user + sys) of the
run, how many cores it kept busy (CPU / wall), the load average before and after, the wall time of
each stage (from the log), and the run's own metrics table. On a shared machine the wall time grows
with the other jobs' load while the CPU time stays close to the quiet machine's (``--threads 1``
runs one busy core: quiet wall ~ CPU time); compare runs by their CPU time, and report the load with
every wall time. A virtual machine's host can be slower on one day than another without any load
showing inside it, so the run is framed by a 2048x2048 fp32 matmul probe (GFLOPS with the run's thread
count, before and after): the budget applies to the wall time as measured, the probe says what the
machine delivered.

    python benchmarks/bench_quickstart.py                    # torch's default threads (the user's run)
    python benchmarks/bench_quickstart.py --threads 1        # one thread (OMP_NUM_THREADS=1)
    python benchmarks/bench_quickstart.py --repeats 2 -- trainer.max_steps=20   # extra overrides
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_restoration import Matmul  # noqa: E402

BUDGET_S = 300.0
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[\w.]+\]\[\w+\] - (.*)$")


def _stage_times(log: str, start: float, end: float) -> dict[str, float]:
    """Wall seconds from ``start`` to the first stage ("start-up": imports, faces, config checks),
    of each pipeline stage (its "Pipeline: stage <name>" line to the next mark) and of the evaluation
    (its first line to ``end``, the summary included); ``start``, ``end``: Unix times."""
    starts = [("start-up", start)]
    for line in log.splitlines():
        match = _STAMP.match(line)
        if match and match.group(2).startswith(("Pipeline: stage ", "Quickstart evaluation")):
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            text = match.group(2)
            starts.append(
                (text.split()[2].rstrip(":") if text.startswith("Pipeline") else "evaluation", when)
            )
    marks = [*starts, ("end", end)]
    return {name: marks[i + 1][1] - when for i, (name, when) in enumerate(starts)}


def matmul_gflops(threads: int | None, probes: int = 5) -> float:
    """Median GFLOPS of ``bench_restoration``'s matmul probe with ``threads`` torch threads (None:
    torch's default), in this process: it only waits for the run in between."""
    if threads:
        torch.set_num_threads(threads)
    probe = Matmul(torch.device("cpu"))
    return statistics.median(probe() for _ in range(probes))


def run_once(threads: int | None, overrides: list[str]) -> dict:
    """One quickstart in a fresh folder: timings, load and the printed summary."""
    env = dict(os.environ, WANDB_MODE="disabled")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    train = Path(sys.executable).with_name("codeformer-train")
    with tempfile.TemporaryDirectory(prefix="bench_quickstart_") as folder:
        load_before = os.getloadavg()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        proc = subprocess.run(
            [str(train), "experiment=quickstart", *overrides],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        end = time.time()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(
                f"the quickstart failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        log = proc.stdout + proc.stderr
        cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
        summary = proc.stdout[proc.stdout.rfind("Finished the pipeline") :]
        return {
            "wall": end - start,
            "cpu": cpu,
            "load": (load_before, os.getloadavg()),
            "stages": _stage_times(log, start, end),
            "table": summary[summary.find("Final metrics") :].strip(),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads (default: torch's own choice)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="extra overrides of codeformer-train (after --)")
    args = parser.parse_args(argv)
    print(f"codeformer-train experiment=quickstart {' '.join(args.overrides)}; {os.cpu_count()} CPUs; "
          f"threads: {args.threads or 'default'}; budget {BUDGET_S:.0f} s")  # fmt: skip
    for k in range(args.repeats):
        probe_before = matmul_gflops(args.threads)
        r = run_once(args.threads, args.overrides)
        probe_after = matmul_gflops(args.threads)
        (b1, b5, _), (a1, a5, _) = r["load"]
        stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in r["stages"].items())
        print(
            f"run {k + 1}: wall {r['wall']:.1f} s ({r['wall'] / BUDGET_S:.2f} x budget), CPU {r['cpu']:.1f} s "
            f"(user + sys; {r['cpu'] / r['wall']:.2f} cores busy), load avg 1/5 min {b1:.1f}/{b5:.1f} before, "
            f"{a1:.1f}/{a5:.1f} after\n  machine: 2048^2 fp32 matmul {probe_before:.0f} GFLOPS before, "
            f"{probe_after:.0f} after\n  wall by part: {stages}\n"
            + "\n".join(f"  {line}" for line in r["table"].splitlines())
        )


if __name__ == "__main__":
    main()

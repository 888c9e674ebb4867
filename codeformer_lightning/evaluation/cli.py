"""``codeformer-evaluate``: metrics for restored faces, from folders or by running a model over w.

Paired folders, or the output of ``codeformer-restore`` (one run per w it restored at)::

    codeformer-evaluate --restored results/ --gt gt/ --out eval/ --vgg-weights vgg16-397923af.pth
    codeformer-restore lq/ --aligned -o restored/ --weights codeformer.pth -w 0 0.5 1
    codeformer-evaluate --restored restored/ --gt gt/ --out eval/      # reports w = 0, 0.5, 1

Restore first, at several fidelity weights, and plot the trade-off::

    codeformer-evaluate --weights codeformer.pth --lq lq/ --gt gt/ -w 0 0.5 1 --out eval/

Writes ``metrics.md``, ``metrics.csv``, ``metrics.json`` (per image and mean) and, for several w,
``fidelity_quality.png`` to ``--out``. Metrics whose weights are missing are listed as unavailable
with what to provide; the others run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..inference.tasks import TASKS, TaskError
from .images import PairingError
from .metrics import ALL_METRICS, EvaluationConfig, evaluate_model, evaluate_restored
from .report import write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="codeformer-evaluate",
        description="PSNR, SSIM, LPIPS, FID, identity and landmark metrics for restored faces.",
    )
    src = p.add_argument_group("what to evaluate (either --restored, or --weights with --lq)")
    src.add_argument(
        "--restored",
        type=Path,
        help="folder of restored images matched to --gt by file stem, or codeformer-restore's output folder (its "
        "final_results/; names <stem>_w0.50 give one run per w)",
    )
    src.add_argument(
        "--suffix", default="", help="with --restored: the --suffix codeformer-restore was run with"
    )
    src.add_argument("--gt", type=Path, required=True, help="folder of ground-truth images")
    src.add_argument(
        "--weights", type=Path, help="CodeFormer weight file (.pth or .safetensors): restore --lq first"
    )
    src.add_argument("--lq", type=Path, help="folder of aligned low-quality faces (with --weights)")
    src.add_argument(
        "-w",
        "--fidelity-weight",
        dest="ws",
        type=float,
        nargs="+",
        default=None,
        help="fidelity weight(s) w, usually in [0, 1], to restore at (with --weights); default: the task's published "
        "value (0.5 restoration, 0 colorization, 1 inpainting)",
    )
    src.add_argument("--no-adain", action="store_true", help="restore without AdaIN colour correction")
    src.add_argument(
        "--task",
        choices=TASKS,
        default=None,
        help="with --weights: the published inference to apply (default: the weights' variant)",
    )
    src.add_argument(
        "--mask",
        type=Path,
        default=None,
        metavar="FILE|FOLDER",
        help="inpainting masks (white = filled pixels), one file or a folder matched by name: adds PSNR/SSIM "
        "inside the mask. With inpainting --weights the default is the LQ faces' pure-white pixels",
    )
    src.add_argument("--batch-size", type=int, default=4, help="faces per restoration batch (default 4)")
    src.add_argument(
        "--save-restored", action="store_true", help="also write restored PNGs to OUT/restored/w_<w>/"
    )
    m = p.add_argument_group("metrics and their weights")
    m.add_argument(
        "--metrics",
        nargs="+",
        choices=ALL_METRICS,
        default=list(ALL_METRICS),
        help="metrics to compute (default: all; those lacking weights are reported unavailable)",
    )
    m.add_argument(
        "--vgg-weights", type=Path, help="LPIPS: torchvision vgg16-397923af.pth (default: torch hub cache)"
    )
    m.add_argument("--lpips-heads", type=Path, help="LPIPS: v0.1 linear heads (default: the published heads shipped with the package)")
    m.add_argument(
        "--fid-weights", type=Path, help="FID: torch-fidelity weights-inception-2015-12-05-6726825d.pth"
    )
    m.add_argument("--arcface-weights", type=Path, help="identity: arcface_torch IResNet backbone.pth")
    m.add_argument(
        "--y-channel", action="store_true", help="PSNR/SSIM on BT.601 luma (Y of YCbCr) instead of RGB"
    )
    m.add_argument(
        "--size-mismatch",
        choices=("resize", "error"),
        default="resize",
        help="restored and gt sizes differ: resize restored to gt (warn), or skip the pair as failed",
    )
    m.add_argument(
        "--not-aligned",
        action="store_true",
        help="images are not FFHQ-aligned faces: identity uses whole images instead of ArcFace's crop",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.md/.csv/.json and the plot")
    p.add_argument(
        "--plot-backend",
        choices=("auto", "matplotlib", "pil"),
        default="auto",
        help="fidelity-quality plot: matplotlib if installed (auto), else a plain PIL drawing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns 0 on success, 2 on bad arguments or unmatched folders."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.restored is None) == (args.weights is None):
        parser.error("give either --restored DIR, or --weights FILE with --lq DIR")
    if args.weights is not None and args.lq is None:
        parser.error("--weights needs --lq DIR (the low-quality faces to restore)")
    if args.weights is None and (args.lq is not None or args.ws is not None or args.task is not None):
        parser.error("--lq, -w and --task only apply with --weights")
    # above 1 is allowed (with a warning), as in codeformer-restore
    if any(not w >= 0.0 for w in args.ws or []):
        parser.error(f"fidelity weights must be >= 0 (usually in [0, 1]), got {args.ws}")
    if args.suffix and args.restored is None:
        parser.error("--suffix only applies with --restored")
    config = EvaluationConfig(
        metrics=args.metrics,
        vgg_weights=args.vgg_weights,
        lpips_heads=args.lpips_heads,
        fid_weights=args.fid_weights,
        arcface_weights=args.arcface_weights,
        y_channel=args.y_channel,
        size_mismatch=args.size_mismatch,
        aligned=not args.not_aligned,
        device=args.device,
    )
    try:
        if args.weights is not None:
            from ..checkpoints import CheckpointError

            try:
                results = evaluate_model(
                    args.weights,
                    args.lq,
                    args.gt,
                    args.ws,
                    config,
                    adain=False if args.no_adain else None,
                    task=args.task,
                    masks=args.mask,
                    batch_size=args.batch_size,
                    save_dir=args.out / "restored" if args.save_restored else None,
                )
            except CheckpointError as exc:
                print(f"codeformer-evaluate: {exc}", file=sys.stderr)
                return 2
        else:
            results = evaluate_restored(args.restored, args.gt, config, masks=args.mask, suffix=args.suffix)
    except (PairingError, FileNotFoundError, TaskError) as exc:  # TaskError: a --mask that does not fit
        print(f"codeformer-evaluate: {exc}", file=sys.stderr)
        return 2
    written = write_report(results, args.out, args.plot_backend)
    print(written["markdown"].read_text(encoding="utf-8").split("\n## Per image")[0].rstrip())
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

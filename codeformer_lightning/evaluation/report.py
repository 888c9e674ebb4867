"""Writing evaluation results: markdown, CSV and JSON tables, and the fidelity-quality plot over w.

The plot uses matplotlib (Agg backend) when it is importable; matplotlib is not a runtime
dependency, so without it a plain chart is drawn with PIL.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .metrics import LOWER_IS_BETTER, SET_METRICS, EvaluationResult

_DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4, "fid": 2, "identity": 4, "landmarks": 4, "psnr_mask": 2, "ssim_mask": 4}
_TITLES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "fid": "FID",
    "identity": "Identity (cos)",
    "landmarks": "Landmark dist.",
    "psnr_mask": "PSNR in mask (dB)",
    "ssim_mask": "SSIM in mask",
}


def _fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{_DIGITS.get(metric, 4)}f}"


def _columns(results: Sequence[EvaluationResult]) -> list[str]:
    """Metrics computed in at least one run, in table order."""
    seen: list[str] = []
    for r in results:
        for m in r.metrics:
            if m not in seen and (m in r.mean or any(m in v for v in r.per_image.values())):
                seen.append(m)
    return seen


def _arrow(metric: str) -> str:
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def write_markdown(results: Sequence[EvaluationResult], path: str | Path) -> Path:
    """Summary (one row per run), unavailable metrics, failed images, then per-image tables."""
    path = Path(path)
    cols = _columns(results)
    lines = ["# Evaluation", "", "## Mean over images", ""]
    lines.append("| run | images | " + " | ".join(f"{_TITLES.get(m, m)} {_arrow(m)}" for m in cols) + " |")
    lines.append("|---|---:|" + "---:|" * len(cols))
    for r in results:
        row = [r.label, str(len(r.per_image))] + [_fmt(m, r.mean.get(m)) for m in cols]
        lines.append("| " + " | ".join(row) + " |")
    unavailable = {m: why for r in results for m, why in r.unavailable.items()}
    if unavailable:
        lines += ["", "## Unavailable metrics", ""]
        lines += [f"- **{m}**: {why}" for m, why in unavailable.items()]
    failed = [(r.label, n, e) for r in results for n, e in r.failed.items()]
    notes = sorted({f"{r.label}: {n}" for r in results for n in r.notes})
    if failed:
        lines += ["", "## Images left out", ""] + [f"- {label} / {n}: {e}" for label, n, e in failed]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    image_cols = [m for m in cols if m not in SET_METRICS]
    for r in results:
        lines += ["", f"## Per image: {r.label}", ""]
        lines.append("| image | " + " | ".join(_TITLES.get(m, m) for m in image_cols) + " |")
        lines.append("|---|" + "---:|" * len(image_cols))
        for name, values in r.per_image.items():
            lines.append("| " + " | ".join([name] + [_fmt(m, values.get(m)) for m in image_cols]) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(results: Sequence[EvaluationResult], path: str | Path) -> Path:
    """Columns ``run, w, image, <metrics>``: one row per image, then a ``mean`` row per run.

    Empty cells: not measurable for that image (no face) or a set metric (FID: mean row only).
    """
    path = Path(path)
    cols = _columns(results)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "w", "image", *cols])
        for r in results:
            w = "" if r.w is None else f"{r.w:g}"
            for name, values in r.per_image.items():
                writer.writerow(
                    [r.label, w, name, *("" if values.get(m) is None else repr(values[m]) for m in cols)]
                )
            writer.writerow(
                [r.label, w, "mean", *("" if r.mean.get(m) is None else repr(r.mean[m]) for m in cols)]
            )
    return path


def write_json(results: Sequence[EvaluationResult], path: str | Path) -> Path:
    """``{"runs": [EvaluationResult.to_dict(), ...]}`` (PSNR capped, so no inf in the file)."""
    path = Path(path)
    path.write_text(
        json.dumps({"runs": [r.to_dict() for r in results]}, indent=2, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    return path


def plot_over_w(
    results: Sequence[EvaluationResult], path: str | Path, backend: str = "auto"
) -> tuple[Path, str]:
    """Fidelity-quality trade-off: PSNR (fidelity) and LPIPS (quality) means against ``w``.

    Also draws identity similarity when it was computed. ``backend``: ``"auto"`` (matplotlib if
    importable, else PIL), ``"matplotlib"`` or ``"pil"``. Returns ``(path, backend used)``.
    Raises ValueError when fewer than two runs have a ``w``.
    """
    runs = sorted((r for r in results if r.w is not None), key=lambda r: r.w)
    if len(runs) < 2:
        raise ValueError("a plot over w needs results for at least two values of w")
    series = {
        m: [(r.w, r.mean[m]) for r in runs if r.mean.get(m) is not None]
        for m in ("psnr", "lpips", "identity")
    }
    series = {m: pts for m, pts in series.items() if pts}
    if not series:
        raise ValueError("none of PSNR, LPIPS, identity was computed: nothing to plot")
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401

            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    path = Path(path)
    if backend == "matplotlib":
        _plot_matplotlib(series, path)
    elif backend == "pil":
        _plot_pil(series, path)
    else:
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'pil', got {backend!r}")
    return path, backend


def _plot_matplotlib(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for ax, (metric, pts) in zip(axes[0], series.items()):
        ws, vals = zip(*pts)
        ax.plot(ws, vals, marker="o")
        ax.set_xlabel("fidelity weight w")
        ax.set_title(f"{_TITLES[metric]} {_arrow(metric)}")
        ax.grid(alpha=0.3)
    fig.suptitle("CodeFormer fidelity-quality trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pil(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """One small panel per metric: axes, polyline, markers and min/max labels."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin = 320, 240, 40
    image = Image.new("RGB", (panel_w * len(series), panel_h), "white")
    draw = ImageDraw.Draw(image)
    for k, (metric, pts) in enumerate(series.items()):
        x0, y0, x1, y1 = k * panel_w + margin, 30, (k + 1) * panel_w - 15, panel_h - margin
        draw.rectangle((x0, y0, x1, y1), outline="black")
        ws, vals = zip(*pts)
        w_lo, w_hi = min(ws), max(ws)
        v_lo, v_hi = min(vals), max(vals)
        w_span, v_span = (w_hi - w_lo) or 1.0, (v_hi - v_lo) or 1.0
        xy = [(x0 + (w - w_lo) / w_span * (x1 - x0), y1 - (v - v_lo) / v_span * (y1 - y0)) for w, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(31, 119, 180))
        draw.text(
            (x0, 8),
            f"{_TITLES[metric]} {'(lower better)' if metric in LOWER_IS_BETTER else '(higher better)'}",
            fill="black",
        )
        draw.text((x0 - 35, y0), _fmt(metric, v_hi), fill="black")
        draw.text((x0 - 35, y1 - 10), _fmt(metric, v_lo), fill="black")
        draw.text((x0, y1 + 5), f"w={w_lo:g}", fill="black")
        draw.text((x1 - 30, y1 + 5), f"w={w_hi:g}", fill="black")
    image.save(path)


def write_report(
    results: Sequence[EvaluationResult], out_dir: str | Path, plot_backend: str = "auto"
) -> dict[str, Path]:
    """Write ``metrics.md``, ``metrics.csv``, ``metrics.json`` and, for several w, ``fidelity_quality.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": write_markdown(results, out_dir / "metrics.md"),
        "csv": write_csv(results, out_dir / "metrics.csv"),
        "json": write_json(results, out_dir / "metrics.json"),
    }
    if sum(r.w is not None for r in results) >= 2:
        try:
            written["plot"], _ = plot_over_w(results, out_dir / "fidelity_quality.png", plot_backend)
        except ValueError:
            pass  # nothing plottable (every curve metric unavailable): the tables say why
    return written

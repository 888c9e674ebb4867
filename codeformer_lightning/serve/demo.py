"""``codeformer-demo --weights W``: a web page (Gradio) to restore the faces of an uploaded photo.

Upload a photo, move the fidelity slider (w: 0 = best quality, 1 = closest to the input), see the
result as a before/after slider, the faces found in a gallery (each face's aligned input and its
restoration) and download the result as PNG. Problems (a file that is not an image, a truncated
file, an image over the pixel limit) are reported in the page's status line, never as a
traceback. The page is a thin layer over :class:`FaceRestorer`, so what it shows is what the
library and ``codeformer-serve`` compute.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from codeformer_lightning.inference.restorer import FaceRestorer
from codeformer_lightning.inference.tasks import TaskError
from codeformer_lightning.io import BadImageError, composite_on_white, read_image_with_alpha, write_image
from codeformer_lightning.serve.protocol import Limits, output_image

ELEMENT_IDS = {"photo": "photo", "fidelity": "fidelity", "before_after": "before-after", "faces": "faces",
               "download": "download", "status": "status"}


@dataclass
class DemoOutput:
    """What the page shows for one run. ``before``/``after``: ``(H, W, 3)`` uint8 RGB of equal size;
    ``faces``: (image, caption) pairs; ``download``: path of the result PNG; ``status``: Markdown."""

    status: str
    before: np.ndarray | None = None
    after: np.ndarray | None = None
    faces: list[tuple[np.ndarray, str]] = field(default_factory=list)
    download: str | None = None


class DemoRestorer:
    """Runs one photo through ``restorer`` for the page and writes the downloadable PNG into ``folder``."""

    def __init__(self, restorer: FaceRestorer, folder: Path, max_pixels: int = Limits.max_pixels) -> None:
        self.restorer = restorer
        self.folder = Path(folder)
        self.max_pixels = max_pixels

    def run(self, path: str | None, w: float, aligned: bool = False, only_center_face: bool = False,
            upscale: float = 1.0) -> DemoOutput:
        if not path:
            return DemoOutput("Upload a photo to start.")
        started = time.perf_counter()
        try:
            rgb, alpha = read_image_with_alpha(path, self.max_pixels)
        except BadImageError as exc:
            return DemoOutput(f"**Could not read the image:** {exc.reason}.")
        # what the server does with transparency: restore on white, keep alpha in the PNG
        image = composite_on_white(rgb, alpha)
        try:
            prepared = self.restorer.prepare(image, float(w), aligned, upscale=upscale,
                                             only_center_face=only_center_face)
        except TaskError as exc:  # e.g. a whole photo for inpainting: say what to do instead
            return DemoOutput(f"**Cannot run {self.restorer.task.name}:** {exc}.")
        result = self.restorer.complete([image], [prepared])[0]
        after = result.image
        before = result.cropped_faces[0] if aligned else _resized(image, after.shape)
        faces = []
        for k, (crop, restored) in enumerate(zip(result.cropped_faces, result.restored_faces[result.ws[0]])):
            faces += [(crop, f"face {k + 1}: input"), (restored, f"face {k + 1}: w = {result.ws[0]:.2f}")]
        download = self._write(Path(path).stem, *output_image(result, result.ws[0], rgb, alpha), result.ws[0])
        seconds = time.perf_counter() - started
        count = len(result.cropped_faces)
        status = (f"Restored {count} face{'s' if count != 1 else ''} at w = {result.ws[0]:.2f} in {seconds:.2f} s; "
                  f"output {after.shape[1]}x{after.shape[0]} px." if count else
                  "No face found: the photo is shown unchanged.")
        notes = [n for n in result.notes if "no face" not in n]
        return DemoOutput(status + "".join(f" Note: {n}." for n in notes), before, after, faces, download)

    def _write(self, stem: str, image: np.ndarray, alpha: np.ndarray | None, w: float) -> str:
        folder = self.folder / uuid.uuid4().hex[:12]  # a file per run: an earlier link keeps working
        folder.mkdir(parents=True)
        path = folder / f"{stem}_restored_w{w:.2f}.png"
        write_image(path, image, alpha)
        return str(path)


def _resized(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if image.shape[:2] == shape[:2]:
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def build_demo(demo_restorer: DemoRestorer, max_upscale: float = Limits.max_upscale):
    """The Gradio ``Blocks`` page (not launched). Every input change re-runs the restoration; a
    slider drag only runs for its last position (``trigger_mode="always_last"``)."""
    import gradio as gr

    ids = ELEMENT_IDS
    with gr.Blocks(title="CodeFormer face restoration", analytics_enabled=False) as demo:
        task = demo_restorer.restorer.task
        gr.Markdown("## CodeFormer face restoration\nUpload a photo; move **w** towards 0 for quality, "
                    f"towards 1 for fidelity to the input.\n\nTask of these weights: {task.describe()}.")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"],
                                 elem_id=ids["photo"])
                # the task's published w; colorization and inpainting fix it (the slider then stays put)
                fidelity = gr.Slider(0.0, 1.0, value=task.w, step=0.01, interactive=not task.fixed_w,
                                     label="w (fidelity)" if not task.fixed_w else f"w (fixed by {task.name})",
                                     elem_id=ids["fidelity"])
                with gr.Row():
                    aligned = gr.Checkbox(label="already an aligned face", value=not task.whole_photos)
                    center = gr.Checkbox(label="only the centre face", value=False)
                upscale = gr.Slider(1, max_upscale, value=1, step=0.5, label="upscale")
                status = gr.Markdown("Upload a photo to start.", elem_id=ids["status"])
            with gr.Column(scale=2):
                before_after = gr.ImageSlider(label="before | after", type="numpy", format="png",
                                              elem_id=ids["before_after"])
                download = gr.DownloadButton("Download result (PNG)", value=None, interactive=False,
                                             elem_id=ids["download"])
                faces = gr.Gallery(label="faces found (input, restored)", columns=4, height="auto",
                                   format="png", elem_id=ids["faces"])

        def restore(path, w, is_aligned, only_center, scale):
            out = demo_restorer.run(path, w, is_aligned, only_center, scale)
            pair = (out.before, out.after) if out.after is not None else None
            button = gr.DownloadButton(value=out.download, interactive=out.download is not None)
            return pair, out.faces, button, out.status

        inputs = [photo, fidelity, aligned, center, upscale]
        outputs = [before_after, faces, download, status]
        for control in inputs:
            control.change(restore, inputs, outputs, trigger_mode="always_last", show_progress="minimal")
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeformer-demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, type=Path, help="CodeFormer weights (.pth or .safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to let other machines in")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--detector", choices=("mtcnn", "retinaface"), default="mtcnn")
    p.add_argument("--detector-weights", type=Path, default=None)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="largest photo, width x height")
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.weights.is_file():
        print(f"codeformer-demo: --weights {args.weights}: no such file", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    import gradio as gr

    restorer = FaceRestorer(args.weights, detector=args.detector, device=args.device, precision=args.precision,
                            detector_weights=args.detector_weights)
    _ = restorer.detector  # built now: a missing detector file stops start-up, not the first photo
    folder = Path(tempfile.mkdtemp(prefix="codeformer-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    demo = build_demo(DemoRestorer(restorer, folder, args.max_pixels))
    demo.queue(default_concurrency_limit=1)  # one network: runs take turns
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: server closed, files removed
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False, theme=theme,
                max_file_size=int(args.max_upload_mb * 2**20))
    return 0


if __name__ == "__main__":
    sys.exit(main())

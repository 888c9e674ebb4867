"""Export CodeFormer with the fidelity weight ``w`` as a graph *input* (ONNX, TorchScript, torch.export).

The published export path fails because ``w`` is a Python float and ``CodeFormer.restore`` branches on
it (``w == 0`` skips the fusion blocks). :class:`ExportableCodeFormer` always passes ``w`` as a tensor,
which takes the branch-free path of ``restore``: every fusion block runs and computes
``dec + w * (dec * scale + shift)``. For ``w = 0`` that is ``dec + 0 * (...) == dec`` exactly (as long as
the modulation is finite), i.e. bit-identical to the published skip; the tests check this.

Graph contract (all three formats)::

    image    (B, 3, S, S) float32 in [-1, 1]     (S = the model's img_size, 512 published)
    w        (B,) float32 in [0, 1]; ONNX also takes (1,), broadcast to the batch;
             the torch loaders below also take a 0-d tensor or a float
    restored (B, 3, S, S) float32, clamped to [-1, 1]
    indices  (B, L) int64, the predicted codebook indices (L = (S/32)^2), unless ``with_indices=False``

The batch dimension is dynamic. ``dtype="fp16"`` stores the weights and runs the graph in fp16 but keeps
fp32 inputs and outputs (casts sit at the graph's entry and exit), so callers need not change.

AdaIN is a build-time flag: whether the looked-up codebook features get the LQ latent's channel
statistics is a different graph (extra reductions), not a runtime value, and the published restoration
always uses ``adain=True``. Export with ``adain=False`` (``--no-adain``) for models trained/evaluated
without it (e.g. inpainting).
"""

from __future__ import annotations

import argparse
import copy as copy_module
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn import CodeFormer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT_NAMES = ["image", "w"]


class ExportableCodeFormer(nn.Module):
    """Trace-friendly CodeFormer: ``(image (B,3,S,S), w (B,)|(1,)|()) -> (restored, indices)``.

    ``image`` float in [-1, 1] of any float dtype: it is cast to the weights' dtype on entry and the
    result back to the input's dtype, so an fp16 model keeps fp32 I/O. ``restored`` is clamped to
    [-1, 1]; ``indices`` ``(B, L)`` int64 (dropped when ``with_indices=False``).
    """

    def __init__(self, model: CodeFormer, adain: bool = True, with_indices: bool = True) -> None:
        super().__init__()
        if not isinstance(model, CodeFormer):
            raise TypeError(f"can only export a CodeFormer restoration network, got {type(model).__name__}")
        self.model = model
        self.adain = adain
        self.with_indices = with_indices

    def forward(self, image: torch.Tensor, w: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        compute_dtype = self.model.position_emb.dtype
        x = image.to(compute_dtype)
        # Always a (B,) tensor: restore() then takes its branch-free path (no `if w == 0`), and a
        # (1,) or 0-d weight is broadcast to the batch inside the graph.
        weight = w.to(compute_dtype).reshape(-1).expand(x.shape[0])
        out = self.model.restore(x, weight, adain=self.adain)
        restored = out.image.clamp(-1.0, 1.0).to(image.dtype)
        return (restored, out.indices) if self.with_indices else restored


def prepare(model: CodeFormer, adain: bool = True, dtype: str = "fp32", with_indices: bool = True) -> ExportableCodeFormer:
    """Wrap a copy of ``model`` (eval, CPU, ``dtype`` weights) for export; ``model`` is left untouched."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    copy = copy_module.deepcopy(model).to(device="cpu", dtype=DTYPES[dtype]).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    return ExportableCodeFormer(copy, adain=adain, with_indices=with_indices).eval()


def example_inputs(model: CodeFormer, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic example ``image (batch,3,S,S)`` in [-1,1] and ``w (batch,)`` spread over [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    size = model.img_size
    # smooth random images (upsampled noise) look more like faces to the code predictor than white noise
    coarse = torch.rand(batch, 3, max(size // 8, 1), max(size // 8, 1), generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    w = torch.linspace(0.0, 1.0, batch) if batch > 1 else torch.tensor([0.5])
    return image * 2 - 1, w


def _output_names(with_indices: bool) -> list[str]:
    return ["restored", "indices"] if with_indices else ["restored"]


def _quiet_tracing():
    """Silence the tracer's warnings about shape checks (``x.shape != ...``): they guard nothing the
    graph needs, and the export is verified numerically instead."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    warnings.filterwarnings("ignore", message=".*will be removed.*")
    warnings.filterwarnings("ignore", message=".*Constant folding.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*")
    return ctx


def export_onnx(
    model: CodeFormer,
    path: str | Path,
    adain: bool = True,
    opset: int = 17,
    dtype: str = "fp32",
    dynamic_batch: bool = True,
    with_indices: bool = True,
    check: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file (contract in the module docstring) and return its path.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra package. ``opset`` must
    be >= 17 (LayerNormalization). ``check`` runs ``onnx.checker`` on the written file.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices)
    # trace at batch 1: the dynamic axes below generalise it; w's own length may be 1 or B
    image, w = example_inputs(model, batch=1)
    outputs = _output_names(with_indices)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"image": {0: "batch"}, "w": {0: "w_batch"}}
        dynamic_axes.update({name: {0: "batch"} for name in outputs})
    ctx = _quiet_tracing()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (image, w), str(path), dynamo=False, opset_version=opset,
                input_names=INPUT_NAMES, output_names=outputs, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        ctx.__exit__(None, None, None)
    if check:
        import onnx

        onnx.checker.check_model(str(path))
    return path


def export_torchscript(
    model: CodeFormer, path: str | Path, adain: bool = True, dtype: str = "fp32", with_indices: bool = True
) -> Path:
    """Write a traced TorchScript module (``torch.jit.load``-able; batch stays dynamic) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices)
    ctx = _quiet_tracing()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example_inputs(model, batch=1), check_trace=False)
    finally:
        ctx.__exit__(None, None, None)
    traced.save(str(path))
    return path


def export_program(
    model: CodeFormer, path: str | Path, adain: bool = True, dtype: str = "fp32", with_indices: bool = True
) -> Path:
    """Write a ``torch.export`` program (``.pt2``) with a dynamic batch to ``path``.

    The program itself takes ``w`` of shape ``(B,)`` exactly (torch.export cannot express "1 or B");
    :func:`load_program` returns a module that broadcasts floats, 0-d and ``(1,)`` weights first.
    """
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices)
    batch = Dim("batch", min=1, max=4096)
    # an example batch of 2: torch.export specialises sizes 0 and 1
    with torch.no_grad():
        program = torch.export.export(
            wrapper, example_inputs(model, batch=2), dynamic_shapes={"image": {0: batch}, "w": {0: batch}}
        )
    torch.export.save(program, str(path))
    return path


class BroadcastWeight(nn.Module):
    """Calls a loaded program with ``w`` broadcast to ``(B,)`` (float, 0-d, ``(1,)`` or ``(B,)``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, image: torch.Tensor, w: float | torch.Tensor):
        w = torch.as_tensor(w, dtype=image.dtype, device=image.device).reshape(-1).expand(image.shape[0])
        return self.module(image, w.contiguous())


def load_program(path: str | Path) -> nn.Module:
    """Load a ``.pt2`` written by :func:`export_program` as a callable ``(image, w) -> outputs``."""
    return BroadcastWeight(torch.export.load(str(path)).module())


def load_torchscript(path: str | Path) -> nn.Module:
    """Load a TorchScript file written by :func:`export_torchscript` (weights on CPU)."""
    return torch.jit.load(str(path), map_location="cpu")


def onnx_session(path: str | Path, providers: Sequence[str] | None = None):
    """An onnxruntime session for ``path`` (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # keep ORT's own warnings (unused initialisers etc.) off the console
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(session, image: np.ndarray, w: float | np.ndarray) -> list[np.ndarray]:
    """Run an exported model: ``image (B,3,S,S)`` float32 in [-1,1], ``w`` float, ``(1,)`` or ``(B,)``.

    Returns ``[restored (B,3,S,S) float32 in [-1,1], indices (B,L) int64]`` (or just ``restored``).
    """
    weight = np.asarray(w, dtype=np.float32).reshape(-1)
    return session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32), "w": weight})


# ----------------------------------------------------------------------------- the command
def _load_model(path: str) -> CodeFormer:
    from ..checkpoints import load_pretrained

    model = load_pretrained(path)
    if not isinstance(model, CodeFormer):
        raise SystemExit(
            f"{path}: holds a {type(model).__name__} ({getattr(model, 'variant', '?')}), not a CodeFormer "
            "restoration network; pass codeformer.pth (or a .safetensors CodeFormer) as --weights"
        )
    return model


def check_export(
    model: CodeFormer, path: str | Path, fmt: str, adain: bool = True, batch: int = 2
) -> tuple[float, float]:
    """Run the exported file and the fp32 PyTorch model on the same inputs (w spread over [0,1]).

    Returns ``(max |restored diff|, fraction of equal code indices)``.
    """
    image, w = example_inputs(model, batch=batch, seed=1)
    with torch.no_grad():
        reference = prepare(model, adain, "fp32")(image, w)
    if fmt == "onnx":
        got = run_onnx(onnx_session(path), image.numpy(), w.numpy())
        got = [torch.from_numpy(t) for t in got]
    else:
        module = load_torchscript(path) if fmt == "torchscript" else load_program(path)
        with torch.no_grad():
            got = module(image, w)
        got = list(got) if isinstance(got, (tuple, list)) else [got]
    diff = (got[0].float() - reference[0]).abs().max().item()
    same = (got[1] == reference[1]).float().mean().item() if len(got) > 1 else float("nan")
    return diff, same


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codeformer-export",
        description=(
            "Export a CodeFormer restoration network with the fidelity weight w as a graph input. "
            "Inputs: image (B,3,S,S) float32 in [-1,1] and w (B,) float32 in [0,1] (ONNX also takes (1,)); "
            "outputs: restored (B,3,S,S) float32 clamped to [-1,1] and indices (B,L) int64, the predicted "
            "codebook indices. The batch dimension is dynamic."
        ),
    )
    parser.add_argument("--weights", required=True, help="CodeFormer weights: published codeformer.pth or our .safetensors")
    parser.add_argument("--out", required=True, help="output file (.onnx, .pt for TorchScript, .pt2 for torch.export)")
    parser.add_argument(
        "--format", choices=["onnx", "torchscript", "export"], default="onnx",
        help="onnx (default), torchscript (torch.jit.trace, load with torch.jit.load) or export "
        "(torch.export program, load with torch.export.load or codeformer_lightning.deploy.export.load_program)",
    )
    parser.add_argument(
        "--fp16", action="store_true",
        help="store weights and compute in fp16; inputs and outputs stay float32 (cast inside the graph)",
    )
    parser.add_argument(
        "--no-adain", action="store_true",
        help="build the graph without AdaIN (matching the codebook features' channel statistics to the LQ "
        "latent). AdaIN is a graph choice fixed at export time, not an input; published restoration uses it, "
        "so keep it unless your model was trained/evaluated without (e.g. inpainting)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument(
        "--size", type=int, default=None,
        help="expected input side S; must equal the network's img_size (512 published): a guard against "
        "exporting the wrong weights. Default: the network's own size",
    )
    parser.add_argument("--no-indices", action="store_true", help="export only the restored image output")
    parser.add_argument("--static-batch", action="store_true", help="ONNX: fix the batch to 1 instead of dynamic")
    parser.add_argument(
        "--check", action="store_true",
        help="run the exported file (onnxruntime on CPU for ONNX) against PyTorch fp32 on a batch of 2 "
        "with w = [0, 1] and report max |diff| and the fraction of equal code indices",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``codeformer-export``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if not Path(args.weights).is_file():
        print(
            f"codeformer-export: weight file {args.weights} not found. Download codeformer.pth from the "
            "CodeFormer release page yourself and pass its local path with --weights (nothing is downloaded).",
            file=sys.stderr,
        )
        return 2
    try:
        model = _load_model(args.weights)
    except Exception as exc:  # CheckpointError and friends already name the file
        print(f"codeformer-export: {exc}", file=sys.stderr)
        return 2
    if args.size is not None and args.size != model.img_size:
        print(
            f"codeformer-export: --size {args.size} does not match {args.weights}, a {model.img_size}x"
            f"{model.img_size} network (its position embedding fixes the input size)",
            file=sys.stderr,
        )
        return 2
    dtype = "fp16" if args.fp16 else "fp32"
    adain = not args.no_adain
    with_indices = not args.no_indices
    try:
        if args.format == "onnx":
            out = export_onnx(model, args.out, adain, args.opset, dtype, not args.static_batch, with_indices)
        elif args.format == "torchscript":
            out = export_torchscript(model, args.out, adain, dtype, with_indices)
        else:
            out = export_program(model, args.out, adain, dtype, with_indices)
    except Exception as exc:
        print(f"codeformer-export: exporting {args.weights} to {args.out} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.format}, {dtype}, adain={adain}, {model.img_size}px, {size_mb:.1f} MiB)")
    if args.check:
        if not with_indices:
            print("--check compares indices too; re-export without --no-indices to check them", file=sys.stderr)
        diff, same = check_export(model, out, args.format, adain)
        print(f"check: max |diff| vs PyTorch fp32 = {diff:.3g}; equal code indices: {same:.2%}")
        if not np.isfinite(diff):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

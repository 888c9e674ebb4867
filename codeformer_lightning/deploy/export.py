"""Export CodeFormer as a graph (ONNX, TorchScript, torch.export), one graph per task.

Each variant's published inference (:mod:`codeformer_lightning.inference.tasks`) is a graph of its own,
chosen from the weights' variant (``--task`` overrides):

* **restoration**: the fidelity weight ``w`` is a graph *input*. The published export path fails because
  ``w`` is a Python float and ``CodeFormer.restore`` branches on it (``w == 0`` skips the fusion blocks).
  :class:`ExportableCodeFormer` always passes ``w`` as a tensor, which takes the branch-free path of
  ``restore``: every fusion block runs and computes ``dec + w * (dec * scale + shift)``. For ``w = 0``
  that is ``dec + 0 * (...) == dec`` exactly (as long as the modulation is finite), i.e. bit-identical
  to the published skip; the tests check this.
* **colorization**: ``w = 0`` and AdaIN fixed in the graph (the fusion blocks are left out); the image
  is the only input.
* **inpainting**: ``w = 1`` without AdaIN fixed in the graph; a ``mask`` input says which pixels to
  fill. They are painted white for the network (the published training input) and only they take its
  output: ``restored = (1 - mask) * image + mask * network``, so the other pixels come back unchanged.
  The published mask is the image's pure-white pixels: ``mask = (image.sum(1, keepdim=True) == 3)``
  (:func:`~codeformer_lightning.inference.tasks.white_mask_tensor`).

Graph contract (all three formats)::

    image    (B, 3, S, S) float32 in [-1, 1]     (S = the model's img_size, 512 published)
    w        restoration only: (B,) float32 in [0, 1]; ONNX also takes (1,), broadcast to the batch;
             the torch loaders below also take a 0-d tensor or a float
    mask     inpainting only: (B, 1, S, S) float32, 1 = fill, 0 = keep (values between blend)
    restored (B, 3, S, S) float32, clamped to [-1, 1]
    indices  (B, L) int64, the predicted codebook indices (L = (S/32)^2), unless ``with_indices=False``

The batch dimension is dynamic. ``dtype="fp16"`` stores the weights and runs the graph in fp16 but keeps
fp32 inputs and outputs (casts sit at the graph's entry and exit), so callers need not change. ONNX files
record the task and its settings in their metadata (``task``, ``w``, ``adain``).

AdaIN is a build-time flag: whether the looked-up codebook features get the LQ latent's channel
statistics is a different graph (extra reductions), not a runtime value. It follows the task (on for
restoration and colorization, off for inpainting); ``--no-adain`` turns it off in restoration graphs.
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

from ..inference.tasks import TASKS, Task, composite_tensor, task_for, task_of_model
from ..nn import CodeFormer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: graph inputs of each task's graph
INPUT_NAMES = {"restoration": ["image", "w"], "colorization": ["image"], "inpainting": ["image", "mask"]}


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, CodeFormer):
        raise TypeError(f"can only export a CodeFormer restoration network, got {type(model).__name__}")


class ExportableCodeFormer(nn.Module):
    """Restoration graph: ``(image (B,3,S,S), w (B,)|(1,)|()) -> (restored, indices)``.

    ``image`` float in [-1, 1] of any float dtype: it is cast to the weights' dtype on entry and the
    result back to the input's dtype, so an fp16 model keeps fp32 I/O. ``restored`` is clamped to
    [-1, 1]; ``indices`` ``(B, L)`` int64 (dropped when ``with_indices=False``).
    """

    def __init__(self, model: CodeFormer, adain: bool = True, with_indices: bool = True) -> None:
        super().__init__()
        _check_model(model)
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


class _FixedTaskGraph(nn.Module):
    """A task whose published inference fixes ``w`` and AdaIN: both are constants of the graph."""

    def __init__(self, model: CodeFormer, task: Task, with_indices: bool = True) -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        self.task = task
        self.with_indices = with_indices

    def _network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a Python float w: w = 0 leaves the fusion blocks out of the graph, as the published call does
        out = self.model.restore(x, self.task.w, adain=self.task.adain)
        return out.image.clamp(-1.0, 1.0), out.indices

    def _outputs(self, restored: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
        restored = restored.to(dtype)
        return (restored, indices) if self.with_indices else restored


class ColorizationGraph(_FixedTaskGraph):
    """Colorization graph: ``image (B,3,S,S) -> (restored, indices)`` at w = 0 with AdaIN."""

    def forward(self, image: torch.Tensor):
        restored, indices = self._network(image.to(self.model.position_emb.dtype))
        return self._outputs(restored, indices, image.dtype)


class InpaintingGraph(_FixedTaskGraph):
    """Inpainting graph: ``(image (B,3,S,S), mask (B,1,S,S)) -> (restored, indices)`` at w = 1 without
    AdaIN; the masked pixels are painted white for the network and only they take its output."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        x = image.to(self.model.position_emb.dtype)
        restored, indices = self._network(composite_tensor(x, torch.ones_like(x), mask.to(x.dtype)))
        # composited in the input's dtype: an fp16 graph too returns the unmasked pixels unchanged
        restored = composite_tensor(image, restored.to(image.dtype), mask.to(image.dtype))
        return self._outputs(restored, indices, image.dtype)


def _graph_task(task: str | Task, adain: bool | None) -> Task:
    """The task of the graph to build; ``adain`` may only change a restoration graph."""
    task = task_for(None, task)
    if adain is not None and task.name != "restoration" and adain != task.adain:
        raise ValueError(
            f"the {task.name} graph's settings are fixed by the published inference (w={task.w:g}, AdaIN "
            f"{'on' if task.adain else 'off'}); export task='restoration' for a graph with w as an input and "
            "AdaIN of your choice"
        )
    return task


def prepare(model: CodeFormer, adain: bool | None = None, dtype: str = "fp32", with_indices: bool = True,
            task: str | Task = "restoration") -> nn.Module:
    """Wrap a copy of ``model`` (eval, CPU, ``dtype`` weights) as ``task``'s graph; ``model`` is left
    untouched. ``adain``: restoration graphs only (default: on)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_model(model)
    task = _graph_task(task, adain)
    copy = copy_module.deepcopy(model).to(device="cpu", dtype=DTYPES[dtype]).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    if task.name == "restoration":
        return ExportableCodeFormer(copy, adain=task.adain if adain is None else adain, with_indices=with_indices).eval()
    graph = ColorizationGraph if task.name == "colorization" else InpaintingGraph
    return graph(copy, task, with_indices).eval()


def example_inputs(model: CodeFormer, batch: int = 2, seed: int = 0,
                   task: str | Task = "restoration") -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs of ``task``'s graph: ``image (batch,3,S,S)`` in [-1,1], then ``w
    (batch,)`` spread over [0, 1] (restoration) or ``mask (batch,1,S,S)`` in {0, 1} (inpainting:
    white blocks, a quarter of the face)."""
    g = torch.Generator().manual_seed(seed)
    size = model.img_size
    # smooth random images (upsampled noise) look more like faces to the code predictor than white noise
    coarse = torch.rand(batch, 3, max(size // 8, 1), max(size // 8, 1), generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1
    name = task_for(None, task).name
    if name == "colorization":
        return (image,)
    if name == "inpainting":
        blocks = torch.rand(batch, 1, 4, 4, generator=g) < 0.25
        mask = torch.nn.functional.interpolate(blocks.float(), size=(size, size), mode="nearest")
        return torch.where(mask.bool(), torch.ones_like(image), image), mask
    w = torch.linspace(0.0, 1.0, batch) if batch > 1 else torch.tensor([0.5])
    return image, w


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
    adain: bool | None = None,
    opset: int = 17,
    dtype: str = "fp32",
    dynamic_batch: bool = True,
    with_indices: bool = True,
    check: bool = True,
    task: str | Task = "restoration",
) -> Path:
    """Write ``model`` as ``task``'s ONNX graph (contract in the module docstring); returns its path.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra package. ``opset`` must
    be >= 17 (LayerNormalization). ``check`` runs ``onnx.checker`` on the written file. The file's
    metadata records ``task``, ``w`` (``"input"`` for restoration) and ``adain``.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices, task)
    name = _graph_task(task, adain).name
    # trace at batch 1: the dynamic axes below generalise it; w's own length may be 1 or B
    inputs = example_inputs(model, batch=1, task=name)
    outputs = _output_names(with_indices)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"image": {0: "batch"}, "w": {0: "w_batch"}, "mask": {0: "batch"}}
        dynamic_axes = {k: v for k, v in dynamic_axes.items() if k in INPUT_NAMES[name]}
        dynamic_axes.update({output: {0: "batch"} for output in outputs})
    ctx = _quiet_tracing()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, inputs, str(path), dynamo=False, opset_version=opset,
                input_names=INPUT_NAMES[name], output_names=outputs, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        ctx.__exit__(None, None, None)
    _record_task(path, graph_settings(wrapper))
    if check:
        import onnx

        onnx.checker.check_model(str(path))
    return path


def graph_settings(graph: nn.Module) -> dict[str, str]:
    """``{"task", "w", "adain"}`` of a graph from :func:`prepare` (w: ``"input"`` when it is one)."""
    if isinstance(graph, ExportableCodeFormer):
        return {"task": "restoration", "w": "input", "adain": str(graph.adain).lower()}
    return {"task": graph.task.name, "w": f"{graph.task.w:g}", "adain": str(graph.task.adain).lower()}


def _record_task(path: Path, settings: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, settings)
    onnx.save(proto, str(path))


def onnx_settings(path: str | Path) -> dict[str, str]:
    """The task settings an exported ONNX file records (empty for files without them)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_torchscript(
    model: CodeFormer, path: str | Path, adain: bool | None = None, dtype: str = "fp32", with_indices: bool = True,
    task: str | Task = "restoration",
) -> Path:
    """Write ``task``'s graph traced as TorchScript (``torch.jit.load``-able; batch stays dynamic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices, task)
    ctx = _quiet_tracing()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example_inputs(model, batch=1, task=task), check_trace=False)
    finally:
        ctx.__exit__(None, None, None)
    traced.save(str(path))
    return path


def export_program(
    model: CodeFormer, path: str | Path, adain: bool | None = None, dtype: str = "fp32", with_indices: bool = True,
    task: str | Task = "restoration",
) -> Path:
    """Write ``task``'s graph as a ``torch.export`` program (``.pt2``) with a dynamic batch to ``path``.

    A restoration program itself takes ``w`` of shape ``(B,)`` exactly (torch.export cannot express
    "1 or B"); :func:`load_program` returns a module that broadcasts floats, 0-d and ``(1,)`` weights first.
    """
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = prepare(model, adain, dtype, with_indices, task)
    name = _graph_task(task, adain).name
    batch = Dim("batch", min=1, max=4096)
    # an example batch of 2: torch.export specialises sizes 0 and 1
    with torch.no_grad():
        program = torch.export.export(
            wrapper, example_inputs(model, batch=2, task=name),
            dynamic_shapes={input_name: {0: batch} for input_name in INPUT_NAMES[name]},
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
    """Load a ``.pt2`` written by :func:`export_program` as a callable with the graph's inputs:
    ``(image, w)`` for restoration (``w`` broadcast first), ``(image)`` or ``(image, mask)``."""
    program = torch.export.load(str(path))
    module = program.module()
    return BroadcastWeight(module) if "w" in program.graph_signature.user_inputs else module


def load_torchscript(path: str | Path) -> nn.Module:
    """Load a TorchScript file written by :func:`export_torchscript` (weights on CPU)."""
    return torch.jit.load(str(path), map_location="cpu")


def onnx_session(path: str | Path, providers: Sequence[str] | None = None):
    """An onnxruntime session for ``path`` (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # keep ORT's own warnings (unused initialisers etc.) off the console
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def run_onnx(session, image: np.ndarray, w: float | np.ndarray | None = None,
             mask: np.ndarray | None = None) -> list[np.ndarray]:
    """Run an exported model: ``image (B,3,S,S)`` float32 in [-1,1]; restoration graphs take ``w``
    (float, ``(1,)`` or ``(B,)``), inpainting graphs ``mask (B,1,S,S)`` (1 = fill).

    Returns ``[restored (B,3,S,S) float32 in [-1,1], indices (B,L) int64]`` (or just ``restored``).
    """
    wanted = [i.name for i in session.get_inputs()]
    feed = {"image": np.ascontiguousarray(image, dtype=np.float32)}
    if "w" in wanted:
        if w is None:
            raise ValueError("this restoration graph takes the fidelity weight w as an input: pass w")
        feed["w"] = np.asarray(w, dtype=np.float32).reshape(-1)
    elif w is not None:
        raise ValueError(f"this graph fixes w (inputs: {wanted}); it takes no w")
    if "mask" in wanted:
        if mask is None:
            raise ValueError("this inpainting graph takes a mask (B,1,S,S), 1 = fill: pass mask "
                             "(the published one: image.sum(1, keepdims=True) == 3)")
        feed["mask"] = np.ascontiguousarray(mask, dtype=np.float32)
    elif mask is not None:
        raise ValueError(f"this graph takes no mask (inputs: {wanted})")
    return session.run(None, feed)


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
    model: CodeFormer, path: str | Path, fmt: str, adain: bool | None = None, batch: int = 2,
    task: str | Task = "restoration",
) -> tuple[float, float]:
    """Run the exported file and the fp32 PyTorch model on the same inputs (:func:`example_inputs`:
    w spread over [0,1] for restoration, white blocks for inpainting).

    Returns ``(max |restored diff|, fraction of equal code indices)``.
    """
    name = _graph_task(task, adain).name
    inputs = example_inputs(model, batch=batch, seed=1, task=name)
    with torch.no_grad():
        reference = prepare(model, adain, "fp32", task=name)(*inputs)
    if fmt == "onnx":
        extra = {INPUT_NAMES[name][1]: inputs[1].numpy()} if len(inputs) > 1 else {}
        got = [torch.from_numpy(t) for t in run_onnx(onnx_session(path), inputs[0].numpy(), **extra)]
    else:
        module = load_torchscript(path) if fmt == "torchscript" else load_program(path)
        with torch.no_grad():
            got = module(*inputs)
        got = list(got) if isinstance(got, (tuple, list)) else [got]
    diff = (got[0].float() - reference[0]).abs().max().item()
    same = (got[1] == reference[1]).float().mean().item() if len(got) > 1 else float("nan")
    return diff, same


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codeformer-export",
        description=(
            "Export a CodeFormer network as the graph of its task's published inference (the weights' variant, "
            "or --task). Restoration: inputs image (B,3,S,S) float32 in [-1,1] and w (B,) float32 in [0,1] "
            "(ONNX also takes (1,)). Colorization: image only, w=0 and AdaIN fixed. Inpainting: image and mask "
            "(B,1,S,S) float32, 1 = fill, w=1 without AdaIN fixed; unmasked pixels come back unchanged. "
            "Outputs: restored (B,3,S,S) float32 clamped to [-1,1] and indices (B,L) int64, the predicted "
            "codebook indices. The batch dimension is dynamic."
        ),
    )
    parser.add_argument("--weights", required=True, help="CodeFormer weights: published codeformer.pth or our .safetensors")
    parser.add_argument("--out", required=True, help="output file (.onnx, .pt for TorchScript, .pt2 for torch.export)")
    parser.add_argument(
        "--task", choices=TASKS, default=None,
        help="graph to build (default: the weights' variant; other weight shapes give a restoration graph): "
        "restoration (w an input), colorization (w=0, AdaIN), inpainting (w=1, no AdaIN, mask an input)",
    )
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
        help="restoration graphs: build without AdaIN (matching the codebook features' channel statistics to "
        "the LQ latent). AdaIN is a graph choice fixed at export time, not an input; published restoration "
        "and colorization use it, inpainting does not (their graphs fix it)",
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
        "(w = [0, 1] for restoration, white blocks for inpainting) and report max |diff| and the fraction "
        "of equal code indices",
    )
    return parser


def _export(model: CodeFormer, args: argparse.Namespace, task: Task, adain: bool | None, dtype: str) -> Path:
    with_indices = not args.no_indices
    if args.format == "onnx":
        return export_onnx(model, args.out, adain, args.opset, dtype, not args.static_batch, with_indices,
                           task=task)
    if args.format == "torchscript":
        return export_torchscript(model, args.out, adain, dtype, with_indices, task=task)
    return export_program(model, args.out, adain, dtype, with_indices, task=task)


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
    adain = False if args.no_adain else None
    try:
        task = _graph_task(task_of_model(model, args.task), adain)
    except ValueError as exc:
        print(f"codeformer-export: --no-adain: {exc}", file=sys.stderr)
        return 2
    try:
        out = _export(model, args, task, adain, dtype)
    except Exception as exc:
        print(f"codeformer-export: exporting {args.weights} to {args.out} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    size_mb = out.stat().st_size / 2**20
    origin = "--task" if args.task else f"from the weights' variant {getattr(model, 'variant', None)!r}"
    print(f"wrote {out} ({args.format}, {dtype}, {task.describe()} ({origin}); inputs {', '.join(INPUT_NAMES[task.name])}; "
          f"{model.img_size}px, {size_mb:.1f} MiB)")
    if args.check:
        if args.no_indices:
            print("--check compares indices too; re-export without --no-indices to check them", file=sys.stderr)
        diff, same = check_export(model, out, args.format, adain, task=task)
        print(f"check: max |diff| vs PyTorch fp32 = {diff:.3g}; equal code indices: {same:.2%}")
        if not np.isfinite(diff):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

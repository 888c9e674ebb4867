"""The fast CPU inference path of the convolutional blocks: oneDNN convolutions with fused post-ops.

:func:`fast_cpu_inference` decides, per call, whether a block may take this path: a float32 CPU
tensor, no autograd (``torch.no_grad`` / ``torch.inference_mode``), not under autocast, and not while
tracing, exporting or compiling (those must see plain torch ops). Where it applies:

* activations are channels_last (NHWC), the layout oneDNN's convolutions read without a reorder;
* each convolution weight is reordered once into oneDNN's blocked layout and cached (re-packed
  when the weight changes: in-place updates bump its version counter, loading replaces its storage);
  the plain path reorders every weight on every call, which costs as much as the convolution
  itself at 16x16;
* residual additions, the fusion blocks' products and LeakyReLU run as convolution post-ops, and
  SiLU runs in place, instead of separate passes over the activations;
* nearest x2 upsampling followed by a 3x3 convolution runs as one 2x2 convolution per output
  phase on the low-resolution input (:func:`upsample_conv`): the same result with 4/9 of the
  multiply-adds, without materialising the upsampled tensor.

Everywhere else the blocks run their plain torch code, unchanged. Both paths agree within float
rounding (tests compare them at 1e-5 on tiny models and 1e-4 on the published size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

# weight Parameter -> (validity key, packed weight, bias); weak, so dropping a model frees its cache
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def fast_cpu_inference(x: torch.Tensor) -> bool:
    """Whether the blocks may run the fused oneDNN path on ``x`` (see the module docstring)."""
    return (
        _ONEDNN
        and type(x) is torch.Tensor  # not a FakeTensor/FunctionalTensor of export or compile
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` in channels_last memory (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def _validity(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t.data_ptr(), t._version, tuple(t.shape))


def _packed(conv: nn.Conv2d, x: torch.Tensor, kind: str, padding: list[int]):
    """``conv``'s weight in oneDNN's layout (and its bias), computed once per weight version.

    ``kind``: ``"plain"`` or ``"upsample"`` (the four phase kernels of :func:`upsample_conv`).
    Weights created under ``torch.inference_mode`` have no version counter, so an in-place change
    could not be seen: those are packed afresh on every call (as the plain path does).
    """
    cacheable = not (conv.weight.is_inference() or (conv.bias is not None and conv.bias.is_inference()))
    key = (kind, _validity(conv.weight), _validity(conv.bias)) if cacheable else None
    hit = _PACKED.get(conv.weight) if cacheable else None
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    if kind == "upsample":
        weight = _phase_kernels(weight)
        bias = None if bias is None else bias.repeat(4)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.contiguous().to_mkldnn(), padding, list(conv.stride), list(conv.dilation), conv.groups, list(x.shape)
    )
    if cacheable:
        _PACKED[conv.weight] = (key, packed, bias)
    return packed, bias


def conv(
    module: nn.Conv2d,
    x: torch.Tensor,
    *,
    add: torch.Tensor | None = None,
    mul: torch.Tensor | None = None,
    leaky_relu: float | None = None,
) -> torch.Tensor:
    """``module(x)`` with one fused post-op: ``+ add``, ``* mul`` (same shape as the output) or LeakyReLU.

    ``x`` ``(B, C_in, H, W)`` channels_last -> ``(B, C_out, H', W')`` channels_last. Fast path only.
    """
    if isinstance(module.padding, str):
        raise ValueError("fused convolutions need numeric padding")
    padding = list(module.padding)
    weight, bias = _packed(module, x, "plain", padding)
    args = (padding, list(module.stride), list(module.dilation), module.groups)
    other, op = (add, "add") if add is not None else (mul, "mul")
    if other is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, channels_last(other), weight, bias, *args, op, None, None, [], None
        )
    if leaky_relu is not None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "leaky_relu", [leaky_relu], "")
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` with SiLU in place on the normalised copy (fast path only)."""
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), inplace=True)


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels ``(O, I, 3, 3)`` -> the 2x2 kernels ``(4*O, I, 2, 2)`` of the four output phases.

    On a nearest x2 upsampled input, output row ``2i + p`` sees input rows ``(i-1, i, i)`` for
    ``p = 0`` and ``(i, i, i+1)`` for ``p = 1``: the kernel rows that fall on the same input row add
    up. Same for columns. Phases are stacked in the order (0,0), (0,1), (1,0), (1,1).
    """

    def fold(w: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
        a, b, c = w.unbind(dim)
        return torch.stack((a, b + c) if phase == 0 else (a + b, c), dim)

    return torch.cat([fold(fold(weight, 2, py), 3, px) for py in (0, 1) for px in (0, 1)])


def upsample_conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``module(nearest_upsample_x2(x))`` for a 3x3, padding 1 convolution, without the upsampling.

    One 2x2 convolution with padding 1 computes all four phase outputs on the ``(H+1, W+1)`` grid
    of window positions; phase ``(py, px)`` is the window grid shifted by ``(py, px)``.
    ``x`` ``(B, C, H, W)`` channels_last -> ``(B, C_out, 2H, 2W)`` channels_last. Fast path only.
    """
    b, _, h, w = x.shape
    weight, bias = _packed(module, x, "upsample", [1, 1])
    phases = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    c = phases.shape[1] // 4
    grid = phases.permute(0, 2, 3, 1)  # (B, H+1, W+1, 4C), a view of the channels_last result
    out = x.new_empty(b, h, 2, w, 2, c)
    for p, (py, px) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, py, :, px, :] = grid[:, py : py + h, px : px + w, p * c : (p + 1) * c]
    return out.view(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def retain_freed_cpu_memory(max_block_bytes: int = 2**31 - 1) -> bool:
    """Keep freed blocks of up to ``max_block_bytes`` in the process heap (glibc only; process-wide).

    glibc returns every freed block above 32 MiB to the kernel, so each new activation of that size
    (a 512x512x64 float map is 64 MiB) is mapped afresh and zeroed page by page by the kernel: about
    a tenth of the CPU time of a 512 px forward. With the thresholds raised (default: the largest
    a C ``int`` holds, 2 GiB, which covers a batch of 8 at 512 px), the heap settles after the first
    forward and later ones reuse it. The cost: the process keeps its peak heap (about the forward's
    peak activations) instead of returning it between calls. Returns False where the C library has
    no ``mallopt`` (not glibc); nothing changes then.
    """
    import ctypes
    import ctypes.util

    if not 0 < max_block_bytes < 2**31:
        raise ValueError(f"max_block_bytes must lie in (0, 2**31) (a C int), got {max_block_bytes}")
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> constants
    return bool(mallopt(m_mmap_threshold, max_block_bytes)) and bool(mallopt(m_trim_threshold, max_block_bytes))

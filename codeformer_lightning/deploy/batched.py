"""Face alignment and paste-back for many faces of many frames at once, on any torch device.

Same geometry as the single-face CPU path (:func:`~codeformer_lightning.inference.align.warp_face`,
:func:`~codeformer_lightning.inference.paste.paste_back`): an *affine* ``(2, 3)`` maps an image pixel
``(x, y)`` to the aligned crop as in ``cv2.warpAffine``, pixel centres at integer coordinates.
``grid_sample`` is driven with ``align_corners=True`` and a grid computed from those pixel
coordinates, so that pixel ``i`` of a side of length ``n`` sits at ``2 i / (n - 1) - 1``: bilinear
sampling then lands exactly where cv2's does, and ``padding_mode="reflection"`` reflects about the
edge pixels' centres, i.e. cv2's ``BORDER_REFLECT_101``. The remaining differences are cv2's
fixed-point interpolation weights (1/32 pixel) and the CPU path's uint8 rounding of the warped crop.

The paste-back mask follows :func:`~codeformer_lightning.inference.paste.face_mask`: the crop's
square warped into the image (bilinear, zeros outside), eroded by its interpolated rim, eroded by the
feather width and Gaussian-blurred with cv2's kernel for that width.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..inference.align import invert_affine
from ..inference.paste import default_feather


def _as_affines(affines: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F, 2, 3)`` float64 on the host: the geometry is tiny, the images never leave the device."""
    m = affines.detach().cpu().double().numpy() if isinstance(affines, torch.Tensor) else np.asarray(affines, np.float64)
    if m.ndim != 3 or m.shape[1:] != (2, 3):
        raise ValueError(f"affines must have shape (F, 2, 3), got {m.shape}")
    return m


def _lattice_map(matrices: np.ndarray, origins: np.ndarray, out_h: int, out_w: int, device: torch.device,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel ``(x, y)``, offset by ``origins[f]`` ``(F, 2)``, mapped by ``matrices[f]`` ``(2, 3)``:
    the two coordinates, each ``(F, out_h, out_w)`` float32 (written into ``out`` when given)."""
    # the offset is folded into the matrix on the host (float64) so the device only does float32 math;
    # an affine map of a pixel lattice is an outer sum of a row and a column term, which is far cheaper
    # than a per-pixel (h, w, 3) product or an interleaving stack
    lin = matrices[:, :, :2]
    shift = matrices[:, :, 2] + np.einsum("fij,fj->fi", lin, origins)
    m = torch.from_numpy(np.concatenate([lin, shift[:, :, None]], 2).astype(np.float32)).to(device)
    xs = torch.arange(out_w, device=device, dtype=torch.float32).view(1, 1, out_w)
    ys = torch.arange(out_h, device=device, dtype=torch.float32).view(1, out_h, 1)
    coords = []
    for k in range(2):
        row, col = m[:, k, 0, None, None] * xs, m[:, k, 1, None, None] * ys + m[:, k, 2, None, None]
        coords.append(row + col if out is None else torch.add(row, col, out=out[k]))
    return coords[0], coords[1]


def _sampling_grid(matrices: np.ndarray, origins: np.ndarray, out_h: int, out_w: int, src_h: int, src_w: int,
                   device: torch.device) -> torch.Tensor:
    """Grid ``(F, out_h, out_w, 2)``: output pixel ``(x, y)`` (offset by ``origins[f]``) mapped by
    ``matrices[f]`` ``(2, 3)`` into a source of ``src_h x src_w`` pixels, in ``grid_sample``'s
    ``align_corners=True`` units (pixel ``i`` of ``n`` at ``2 i / (n - 1) - 1``)."""
    to_unit = np.array([[2.0 / max(src_w - 1, 1), 0.0, -1.0], [0.0, 2.0 / max(src_h - 1, 1), -1.0]])
    normalised = np.einsum("ij,fjk->fik", to_unit[:, :2], matrices)
    normalised[:, :, 2] += to_unit[:, 2]
    grid = torch.empty(len(matrices), out_h, out_w, 2, device=device)
    _lattice_map(normalised, origins, out_h, out_w, device, out=(grid[..., 0], grid[..., 1]))
    return grid


def warp_faces(frames: torch.Tensor, affines: torch.Tensor | np.ndarray, frame_index: torch.Tensor | np.ndarray,
               face_size: int) -> torch.Tensor:
    """Aligned crops of many faces at once: ``cv2.warpAffine(frame, affine, (S, S))`` per face.

    ``frames``: ``(N, C, H, W)`` float (any range; values are interpolated linearly) or uint8.
    ``affines``: ``(F, 2, 3)`` image -> crop. ``frame_index``: ``(F,)`` long, the frame of each face.
    Returns ``(F, C, S, S)`` on ``frames.device`` (``frames.dtype``, float32 for uint8 frames, unrounded),
    bilinear, ``BORDER_REFLECT_101`` outside the frame.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, C, H, W), got {tuple(frames.shape)}")
    m = _as_affines(affines)
    index = torch.as_tensor(frame_index, dtype=torch.long, device=frames.device).reshape(-1)
    if index.numel() != len(m):
        raise ValueError(f"got {len(m)} affines but {index.numel()} frame indices")
    if len(m) == 0:
        return frames.new_zeros(0, frames.shape[1], face_size, face_size)
    height, width = frames.shape[-2:]
    crop_to_image = np.stack([invert_affine(a) for a in m])
    grid = _sampling_grid(crop_to_image, np.zeros((len(m), 2)), face_size, face_size, height, width, frames.device)
    out = frames.new_empty(len(m), frames.shape[1], face_size, face_size, dtype=torch.float32)
    source = frames.float()
    # grid_sample pairs input i with grid i; gathering a frame copy per face would move F whole frames,
    # so faces are taken by rank within their frame (1st faces of all frames, then 2nd, ...) and a
    # rank present in every frame, in frame order, samples the frames tensor itself
    index_np = index.cpu().numpy()
    rank = np.zeros(len(index_np), np.int64)
    seen: dict[int, int] = defaultdict(int)
    for f, n in enumerate(index_np):
        rank[f], seen[int(n)] = seen[int(n)], seen[int(n)] + 1
    for r in range(int(rank.max()) + 1):
        members = np.nonzero(rank == r)[0]
        frames_of = index_np[members]
        if len(members) == source.shape[0] and (frames_of == np.arange(source.shape[0])).all():
            src = source
        else:
            src = source.index_select(0, torch.as_tensor(frames_of, device=frames.device))
        sel = torch.as_tensor(members, device=frames.device)
        out[sel] = F.grid_sample(src, grid.index_select(0, sel), mode="bilinear", padding_mode="reflection",
                                 align_corners=True)
    # integer frames give float crops: rounding them is the caller's choice (see BatchedVideoRestorer)
    return out.to(frames.dtype) if frames.dtype.is_floating_point else out


# ----------------------------------------------------------------------------- paste-back
def _footprints(crop_to_image: np.ndarray, face_size: int, height: int, width: int) -> np.ndarray:
    """Clipped image rectangles ``(F, 4)`` int64 ``(x0, y0, x1, y1)`` of the crops' footprints (+2 px),
    as :func:`~codeformer_lightning.inference.paste.face_mask` cuts them; empty where ``x1 <= x0``."""
    corners = np.array([[0, 0], [face_size, 0], [0, face_size], [face_size, face_size]], dtype=np.float64)
    pts = np.einsum("fij,cj->fci", crop_to_image[:, :, :2], corners) + crop_to_image[:, None, :, 2]
    low = np.floor(pts.min(1)).astype(np.int64) - 2
    high = np.ceil(pts.max(1)).astype(np.int64) + 2
    low = np.maximum(low, 0)
    high = np.minimum(high, [width, height])
    return np.concatenate([low, high], 1)


def _window_min(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``min(x[i : i + size])`` along ``dim`` (length ``n - size + 1``) in O(log size) elementwise passes:
    windows of length ``a`` and ``b`` offset by ``b`` cover one of length ``a + b``, so lengths double."""
    length = 1
    while length < size:
        step = min(length, size - length)
        n = x.shape[dim]
        x = torch.minimum(x.narrow(dim, 0, n - step), x.narrow(dim, step, n - step))
        length += step
    return x


def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """cv2.erode with a ``size x size`` square (anchor at its centre, image border ignored).

    A square's minimum is a row minimum of column minima, and each of those a doubling of windows:
    the cost does not grow with ``size`` (beyond its logarithm), unlike a max-pool.
    """
    if size <= 1:
        return mask
    before = size // 2
    padded = F.pad(mask, (before, size - 1 - before, before, size - 1 - before), value=float("inf"))
    return _window_min(_window_min(padded, size, -1), size, -2)


@functools.lru_cache(maxsize=64)
def _band(ksize: int, block: int) -> np.ndarray:
    """``(block + ksize - 1, block)`` float32: column ``i`` holds cv2's Gaussian taps at rows ``i .. i+ksize-1``,
    so a window of ``block + ksize - 1`` padded samples times it is ``block`` blurred samples.

    cv2's own taps (``getGaussianKernel(ksize, 0)``), not a sampled Gaussian: cv2 uses fixed tables for
    small sizes and rounds the others to fixed point, and the mask must match the single-face path's."""
    taps = cv2.getGaussianKernel(int(ksize), 0).ravel()
    band = np.zeros((block + ksize - 1, block), np.float64)
    for i in range(block):
        band[i : i + ksize, i] = taps
    return band.astype(np.float32)


def _reflect_101(length: int, before: int, total: int) -> np.ndarray:
    """Source index ``(total,)`` of each sample of a line of ``length`` padded by ``before`` at the start
    with cv2's ``BORDER_REFLECT_101`` (``dcb|abcd|cba``, repeated for pads longer than the line)."""
    period = max(2 * (length - 1), 1)
    src = np.mod(np.arange(total) - before, period)
    return np.where(src >= length, period - src, src)


def _blur_columns(x: torch.Tensor, ksize: int) -> torch.Tensor:
    """cv2's 1-D Gaussian (``BORDER_REFLECT_101``) along dim -2 of ``(..., h, w)``; returns ``(..., h, w)``.

    Blocks of ``block`` output rows each read ``block + ksize - 1`` padded rows: one batched product with
    a small band matrix, work ``h * (block + ksize)`` per column instead of a full ``h x h`` product and
    far faster than a 1-channel convolution with a long kernel on the CPU.
    """
    length, pad = x.shape[-2], ksize // 2
    block = max(64, ksize)
    blocks = -(-length // block)
    padded = x.index_select(-2, torch.from_numpy(_reflect_101(length, pad, blocks * block + 2 * pad)).to(x.device))
    # overlapping windows (..., blocks, block + 2 pad, w) as a strided view: rows stay contiguous for BLAS
    windows = padded.unfold(-2, block + 2 * pad, block).transpose(-1, -2)
    band = torch.from_numpy(_band(ksize, block)).to(device=x.device, dtype=x.dtype)
    return torch.matmul(band.T, windows).flatten(-3, -2)[..., :length, :]


def _blur(mask: torch.Tensor, ksize: int) -> torch.Tensor:
    """cv2.GaussianBlur(mask, (ksize, ksize), 0) with its default ``BORDER_REFLECT_101``, ``(..., h, w)`` float."""
    if ksize <= 1:
        return mask
    return _blur_columns(_blur_columns(mask.mT, ksize).mT, ksize)


def _square_coverage(u: torch.Tensor, v: torch.Tensor, face_size: int) -> torch.Tensor:
    """Bilinear sample (zeros outside) of an all-ones ``face_size`` square at pixel coordinates ``(u, v)``.

    What ``grid_sample(ones, padding_mode="zeros", align_corners=True)`` gives, in closed form: in 1-D
    the in-square weight is 1 inside ``[0, S-1]`` and falls linearly to 0 one pixel outside; bilinear
    weights are products, so the 2-D coverage is the product of the 1-D ones.
    """
    def ramp(t: torch.Tensor) -> torch.Tensor:
        return torch.minimum(t + 1.0, face_size - t).clamp_(0.0, 1.0)

    return ramp(u).mul_(ramp(v))


def paste_faces(
    frames: torch.Tensor,
    faces: torch.Tensor,
    affines: torch.Tensor | np.ndarray,
    frame_index: torch.Tensor | np.ndarray,
    feather: int | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Blend restored aligned faces back into their frames, all on ``frames.device``.

    ``frames``: ``(N, C, H, W)`` float, or uint8 (then each blended face is rounded to uint8 as the
    single-face path does); ``faces``: ``(F, C, S, S)`` float in the same value range (0-255 for uint8
    frames); ``affines``: ``(F, 2, 3)`` image -> crop (those that cut the faces out); ``frame_index``:
    ``(F,)``. ``feather``: blend width in image pixels (default: as the single-face path, ~5% of the
    face width). ``inplace``: blend into ``frames`` itself instead of a copy.
    Returns frames ``(N, C, H, W)`` of ``frames.dtype`` (float ones unrounded); several faces of one
    frame are blended in the order given, later over earlier. Faces entirely outside their frame are skipped.

    Only each face's rectangle in its frame is worked on. Faces are grouped by mask recipe (rim and
    feather widths) and footprint size (within a factor of sqrt 2); a group shares one tile, the
    largest footprint of its members, and gets one ``grid_sample``, one closed-form mask, one erosion
    and one blur. Only the final blend into the frames loops over faces, as it must to composite in order.
    """
    m, index = _checked_placement(frames, faces, affines, frame_index)
    out = frames if inplace else frames.clone()
    if len(index) == 0:
        return out
    height, width = frames.shape[-2:]
    linear_inv = np.linalg.inv(m[:, :, :2])
    crop_to_image = np.concatenate([linear_inv, -linear_inv @ m[:, :, 2:]], 2)
    rois = _footprints(crop_to_image, faces.shape[-1], height, width)
    scales = np.sqrt(np.abs(np.linalg.det(linear_inv)))  # image px per crop px
    tiles: dict[int, _Tile] = {}
    source = faces.float()
    for (rim, width_f, _), members in _mask_groups(rois, scales, faces.shape[-1], feather).items():
        tiles.update(_render_group(source, m, rois, members, rim, width_f, (height, width), len(index)))
    _blend_tiles(out, tiles, index)
    return out


#: one face ready to blend: its warped pixels ``(C, h, w)``, mask ``(1, h, w)`` and tile origin ``x0, y0``
_Tile = tuple[torch.Tensor, torch.Tensor, int, int]


def _checked_placement(
    frames: torch.Tensor, faces: torch.Tensor, affines: torch.Tensor | np.ndarray, frame_index
) -> tuple[np.ndarray, np.ndarray]:
    """``(affines (F, 2, 3) float64, frame_index (F,) int64)`` after checking shapes and ranges."""
    if frames.ndim != 4 or faces.ndim != 4 or faces.shape[1] != frames.shape[1] or faces.shape[2] != faces.shape[3]:
        raise ValueError(f"need frames (N,C,H,W) and faces (F,C,S,S), got {tuple(frames.shape)}, {tuple(faces.shape)}")
    m = _as_affines(affines)
    index = np.asarray(torch.as_tensor(frame_index).cpu(), dtype=np.int64).reshape(-1)
    if not len(m) == len(index) == faces.shape[0]:
        raise ValueError(f"got {faces.shape[0]} faces, {len(m)} affines and {len(index)} frame indices")
    if len(index) and (index.min() < 0 or index.max() >= frames.shape[0]):
        raise ValueError(f"frame_index out of range for {frames.shape[0]} frames")
    return m, index


def _mask_groups(
    rois: np.ndarray, scales: np.ndarray, face_size: int, feather: int | None
) -> dict[tuple[int, int, int], list[int]]:
    """Faces that share a tile: same rim and feather widths and footprint size within a factor of
    sqrt 2 -> ``{(rim, feather, size class): [face indices]}``; faces entirely outside are left out."""
    sizes = rois[:, 2:] - rois[:, :2]  # (w, h)
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i in np.nonzero((sizes > 0).all(1))[0]:
        rim = max(2, int(round(2 * scales[i])))
        width_f = default_feather(face_size * scales[i]) if feather is None else int(feather)
        # faces of very different sizes would waste most of a shared tile
        size_class = int(np.ceil(2 * np.log2(sizes[i].max())))
        groups[(rim, width_f, size_class)].append(int(i))
    return groups


def _render_group(
    source: torch.Tensor, m: np.ndarray, rois: np.ndarray, members: list[int], rim: int, width_f: int,
    frame_size: tuple[int, int], count: int,
) -> dict[int, _Tile]:
    """One tile per face of a group: one ``grid_sample``, one closed-form mask, one erosion, one blur."""
    height, width = frame_size
    face_size, device = source.shape[-1], source.device
    tile_w, tile_h = (int(t) for t in (rois[members, 2:] - rois[members, :2]).max(0))
    # tiles keep their face's footprint and stay inside the frame, so a footprint cut by the frame
    # edge has its tile border on that edge too (the erosion and blur borders then match cv2's)
    origins = np.stack([np.minimum(rois[members, 0], width - tile_w),
                        np.minimum(rois[members, 1], height - tile_h)], 1).astype(np.float64)
    grid = _sampling_grid(m[members], origins, tile_h, tile_w, face_size, face_size, device)
    picked = source if members == list(range(count)) else source.index_select(
        0, torch.as_tensor(members, device=device))
    warped = F.grid_sample(picked, grid, mode="bilinear", padding_mode="border", align_corners=True)
    mask = _square_coverage(*_lattice_map(m[members], origins, tile_h, tile_w, device), face_size).unsqueeze(1)
    # eroding by the rim's square then the feather's equals one erosion by their Minkowski sum
    # (a square of side rim + 2 * feather, centres adding up to its centre)
    mask = _erode(mask, rim + 2 * width_f if width_f > 0 else rim)
    if width_f > 0:
        mask = _blur(mask, 4 * width_f + 1)
    mask = mask.clamp_(0.0, 1.0)
    return {i: (warped[j], mask[j], int(origins[j, 0]), int(origins[j, 1])) for j, i in enumerate(members)}


def _blend_tiles(out: torch.Tensor, tiles: dict[int, _Tile], index: np.ndarray) -> None:
    """Blend the tiles into ``out`` in face order (later faces over earlier ones); uint8 frames get
    each blended face rounded, as the single-face path does."""
    rounded = not out.dtype.is_floating_point
    for i in sorted(tiles):
        warped, mask, x0, y0 = tiles[i]
        region = out[index[i], :, y0 : y0 + warped.shape[-2], x0 : x0 + warped.shape[-1]]
        if rounded:
            region.copy_(region.float().lerp_(warped, mask).round_().clamp_(0, 255))
        else:
            region.lerp_(warped.to(region.dtype), mask.to(region.dtype))

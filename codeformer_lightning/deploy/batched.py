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

from collections import defaultdict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..inference.align import apply_affine, invert_affine
from ..inference.paste import default_feather


def _as_affines(affines: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F, 2, 3)`` float64 on the host: the geometry is tiny, the images never leave the device."""
    m = affines.detach().cpu().double().numpy() if isinstance(affines, torch.Tensor) else np.asarray(affines, np.float64)
    if m.ndim != 3 or m.shape[1:] != (2, 3):
        raise ValueError(f"affines must have shape (F, 2, 3), got {m.shape}")
    return m


def _normalise(coords: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel coordinates ``(..., 2)`` -> grid_sample coordinates for ``align_corners=True``."""
    scale = coords.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    return coords * scale - 1.0


def _sampling_grid(matrices: np.ndarray, origins: np.ndarray, out_h: int, out_w: int, src_h: int, src_w: int,
                   device: torch.device) -> torch.Tensor:
    """Grid ``(F, out_h, out_w, 2)``: output pixel ``(x, y)`` (offset by ``origins[f]``) mapped by
    ``matrices[f]`` ``(2, 3)`` into a source of ``src_h x src_w`` pixels."""
    # fold the output offset into the matrix on the host (float64), so the device only does float32 math
    lin = matrices[:, :, :2]
    shift = matrices[:, :, 2] + np.einsum("fij,fj->fi", lin, origins)
    m = torch.from_numpy(np.concatenate([lin, shift[:, :, None]], 2)).float().to(device)
    ys = torch.arange(out_h, device=device, dtype=torch.float32)
    xs = torch.arange(out_w, device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1)  # (h, w, 3)
    coords = torch.einsum("hwk,fik->fhwi", base, m)
    return _normalise(coords, src_w, src_h)


def warp_faces(frames: torch.Tensor, affines: torch.Tensor | np.ndarray, frame_index: torch.Tensor | np.ndarray,
               face_size: int) -> torch.Tensor:
    """Aligned crops of many faces at once: ``cv2.warpAffine(frame, affine, (S, S))`` per face.

    ``frames``: ``(N, C, H, W)`` float (any range; values are interpolated linearly).
    ``affines``: ``(F, 2, 3)`` image -> crop. ``frame_index``: ``(F,)`` long, the frame of each face.
    Returns ``(F, C, S, S)`` on ``frames.device``, bilinear, ``BORDER_REFLECT_101`` outside the frame.
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
    return out.to(frames.dtype)


# ----------------------------------------------------------------------------- paste-back
def _footprint(crop_to_image: np.ndarray, face_size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Clipped image rectangle ``(x0, y0, x1, y1)`` of a crop's footprint (+2 px), None if outside."""
    corners = np.array([[0, 0], [face_size, 0], [0, face_size], [face_size, face_size]], dtype=np.float64)
    pts = apply_affine(crop_to_image, corners)
    x0, y0 = np.floor(pts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """cv2.erode with a ``size x size`` square (anchor at its centre, image border ignored).

    A square's minimum is a row minimum of column minima: two 1-D passes, O(size) not O(size^2).
    """
    if size <= 1:
        return mask
    before = size // 2
    padded = F.pad(-mask, (before, size - 1 - before, before, size - 1 - before), value=-float("inf"))
    return -F.max_pool2d(F.max_pool2d(padded, (1, size), stride=1), (size, 1), stride=1)


def gaussian_kernel(ksize: int) -> torch.Tensor:
    """cv2's own ``getGaussianKernel(ksize, 0)`` as ``(ksize,)`` float64: for small sizes cv2 uses fixed
    binomial-like tables rather than the sampled Gaussian, and the mask must match it exactly."""
    return torch.from_numpy(cv2.getGaussianKernel(int(ksize), 0).ravel().astype(np.float64))


def _blur(mask: torch.Tensor, ksize: int) -> torch.Tensor:
    """cv2.GaussianBlur(mask, (ksize, ksize), 0) with its default ``BORDER_REFLECT_101``."""
    k = gaussian_kernel(ksize).to(mask)
    pad = ksize // 2
    height, width = mask.shape[-2:]
    # torch's "reflect" is REFLECT_101 but needs pad < size; a sliver of a face at the frame edge may be smaller
    mode = "reflect" if pad < min(height, width) else "replicate"
    out = F.conv2d(F.pad(mask, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))


def paste_faces(
    frames: torch.Tensor,
    faces: torch.Tensor,
    affines: torch.Tensor | np.ndarray,
    frame_index: torch.Tensor | np.ndarray,
    feather: int | None = None,
) -> torch.Tensor:
    """Blend restored aligned faces back into their frames, all on ``frames.device``.

    ``frames``: ``(N, C, H, W)`` float; ``faces``: ``(F, C, S, S)`` in the same value range;
    ``affines``: ``(F, 2, 3)`` image -> crop (those that cut the faces out); ``frame_index``: ``(F,)``.
    ``feather``: blend width in image pixels (default: as the single-face path, ~5% of the face width).
    Returns new frames ``(N, C, H, W)`` (float, unrounded); several faces of one frame are blended in
    the order given, later over earlier. Faces entirely outside their frame are skipped.

    Work is batched over a common tile (the largest face footprint): one ``grid_sample`` for all
    faces, one for all masks, erosion and blur per distinct (rim, feather) pair; only the final
    blend into the frame loops over faces, as it must to composite in order.
    """
    if frames.ndim != 4 or faces.ndim != 4 or faces.shape[1] != frames.shape[1] or faces.shape[2] != faces.shape[3]:
        raise ValueError(f"need frames (N,C,H,W) and faces (F,C,S,S), got {tuple(frames.shape)}, {tuple(faces.shape)}")
    m = _as_affines(affines)
    index = np.asarray(torch.as_tensor(frame_index).cpu(), dtype=np.int64).reshape(-1)
    if not len(m) == len(index) == faces.shape[0]:
        raise ValueError(f"got {faces.shape[0]} faces, {len(m)} affines and {len(index)} frame indices")
    if len(index) and (index.min() < 0 or index.max() >= frames.shape[0]):
        raise ValueError(f"frame_index out of range for {frames.shape[0]} frames")
    out = frames.clone()
    height, width = frames.shape[-2:]
    face_size = faces.shape[-1]
    crop_to_image = [invert_affine(a) for a in m]
    rois = [_footprint(inv, face_size, height, width) for inv in crop_to_image]
    live = [i for i, r in enumerate(rois) if r is not None]
    if not live:
        return out
    tile_h = max(rois[i][3] - rois[i][1] for i in live)
    tile_w = max(rois[i][2] - rois[i][0] for i in live)
    # tiles keep their face's footprint and stay inside the frame, so a footprint cut by the frame
    # edge has its tile border on that edge too (the erosion and blur borders then match cv2's)
    origins = np.array([[min(rois[i][0], width - tile_w), min(rois[i][1], height - tile_h)] for i in live], np.float64)
    device = frames.device
    grid = _sampling_grid(m[live], origins, tile_h, tile_w, face_size, face_size, device)
    source = faces.float()
    if len(live) < len(rois):
        source = source.index_select(0, torch.as_tensor(live, device=device))
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="border",
                           align_corners=True)
    square = torch.ones(1, 1, face_size, face_size, device=device).expand(len(live), 1, face_size, face_size)
    masks = F.grid_sample(square, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, i in enumerate(live):
        scale = float(np.sqrt(abs(np.linalg.det(crop_to_image[i][:, :2]))))  # image px per crop px
        rim = max(2, int(round(2 * scale)))
        width_f = default_feather(face_size * scale) if feather is None else int(feather)
        groups[(rim, width_f)].append(j)
    for (rim, width_f), members in groups.items():
        sel = torch.as_tensor(members, device=device)
        mask = _erode(masks.index_select(0, sel), rim)
        if width_f > 0:
            mask = _blur(_erode(mask, 2 * width_f + 1), 4 * width_f + 1)
        masks[sel] = mask.clamp(0.0, 1.0)

    warped = warped.to(out.dtype)
    masks = masks.to(out.dtype)
    for j, i in enumerate(live):
        x0, y0 = int(origins[j, 0]), int(origins[j, 1])
        region = out[index[i], :, y0 : y0 + tile_h, x0 : x0 + tile_w]
        region.add_(masks[j] * (warped[j] - region))
    return out

"""AMT's per-batch tensor operations: align stored attention maps with the crops, and turn
per-patch weights into a masking-and-throwing plan.

Both run on the device inside the training step, batched, with no host synchronization.
"""
from __future__ import annotations

from typing import Optional

import torch
from torchvision.ops import roi_align

from mimscale.masking.base import MaskPlan, plan_sizes


def align_maps(maps: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, grid: int) -> torch.Tensor:
    """Crop each image's attention map with that image's RandomResizedCrop box, mirror it when the
    image was flipped, and average it onto the crop's patch grid.

    maps  [B, g, g] float  attention over the *uncropped* image's g x g patch grid
    boxes [B, 4]    float  (x0, y0, x1, y1) as fractions of the original image (loader contract)
    flips [B]       bool   mirrored after cropping
    grid  int              patches per side of the crop (img_size / patch_size)
    returns [B, grid * grid] float32 weights, row-major like the patch embedding's tokens.

    The map covers the whole original image, so box fractions times g are the box in map cells;
    roi_align averages bilinear samples inside each output cell (sampling_ratio 2 per side), which
    is the mean weight of the map area that patch sees.
    """
    B, g, _ = maps.shape
    rois = torch.cat([torch.arange(B, device=maps.device, dtype=torch.float32)[:, None], boxes.float() * g], dim=1)
    out = roi_align(maps.float()[:, None], rois, output_size=grid, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    out = torch.where(flips.view(B, 1, 1, 1), out.flip(-1), out)
    return out.reshape(B, grid * grid)


# masking.amt.map_crop: how a stored map follows the crop. box: the paper's text (align_maps);
# released: the AMT authors' released maskRandomResizedCrop (align_maps_released).
MAP_CROPS = ("box", "released")


def released_cells(lo: torch.Tensor, hi: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's map rows (or columns) for a crop spanning ``lo``..``hi`` of the image side
    (fractions, the loader's box): first cell and cell count, [B] int64 each.

    The released maskRandomResizedCrop divides the crop's pixel offsets by the image's size and uses
    the quotient as a map *cell* index, where g / size (cells per pixel) was meant: the first cell is
    int(lo) = 0 for every crop, and the slice ends at int(hi) + 2 (the last partial cell's index plus
    one, then one more for an inclusive end): 2 cells, or 3 for a crop that reaches the bottom (rows)
    or right (columns) edge, where hi = 1 exactly. Clamped to the map (g >= 3 always holds).

    Checked against the released code (the mae-AMT and SimMIM-AMT datasets files, which share the
    transform): rows are sliced from ``i // H`` to ``(i + h) // H + 2`` and columns from ``j // W`` to
    ``(j + w) // W + 2`` on the PIL image's pixel offsets, so columns divide by the width, and a crop
    reaches 3 cells exactly when its pixel end equals the image side (hi == 1 here)."""
    first = lo.floor().long()
    stop = (hi.floor().long() + 2).clamp(max=g)
    return first, stop - first


def _resize_matrix(k: int, size: int, device) -> torch.Tensor:
    """[size, k] float32: linear upsampling of k samples to ``size`` as a matrix (torch's,
    align_corners False: what torchvision's ``F.resize(tensor, size)`` does with its default
    BILINEAR mode when it enlarges, antialias having no effect then): column c is the resize of the
    c-th unit vector. Bilinear is separable, so A_r @ M @ A_c^T is the 2-D resize of M."""
    eye = torch.eye(k, device=device, dtype=torch.float32).view(k, 1, k, 1)
    return torch.nn.functional.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


def align_maps_released(maps: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """The AMT authors' released map cropping (``masking.amt.map_crop: released``), batched.

    maps  [B, g, g] float  attention over the uncropped image's g x g patch grid
    boxes [B, 4]    float  (x0, y0, x1, y1) as fractions of the original image (loader contract)
    flips [B]       bool   mirrored after cropping
    grid  int              patches (or SimMIM units) per side of the crop
    size  int              the crop's side in pixels (model.img_size)
    returns [B, grid * grid] float32, row-major.

    Per sample: the map cells ``released_cells`` picks (the top-left 2 x 2 .. 3 x 3) are stretched
    over the whole size x size crop with a bilinear resize (the released call passes no
    interpolation, so torchvision's default applies, not the image's bicubic), clamped to [0, 1]
    as released (a no-op on maps in [0, 1]), mirrored with the image, and
    averaged over each patch's pixels (the map is "tokenized to patches along with the image").
    The resize is a matrix per axis (2 or 3 source cells: two matrices, chosen per sample), so the
    batch runs without host synchronization.
    """
    B, g, _ = maps.shape
    if size % grid:
        raise ValueError(f"crop side {size} px is not a whole number of {grid} patches")
    r0, rn = released_cells(boxes[:, 1].float(), boxes[:, 3].float(), g)  # [B] rows
    c0, cn = released_cells(boxes[:, 0].float(), boxes[:, 2].float(), g)  # [B] columns
    k = 3  # at most 3 cells per axis: gather a 3 x 3 window from the first cell (the map has g >= 3)
    if g < k:
        raise ValueError(f"the released map crop needs a map of at least {k} x {k} cells, got {g} x {g}")
    off = torch.arange(k, device=maps.device)
    rows = (r0[:, None] + off).clamp(max=g - 1)  # [B, 3]
    cols = (c0[:, None] + off).clamp(max=g - 1)
    window = maps.float()[torch.arange(B, device=maps.device)[:, None, None], rows[:, :, None], cols[:, None, :]]  # [B, 3, 3]
    # [size, 3] resize matrices for 2 cells (third column zero: the window's extra cell is ignored) and 3 cells
    two = torch.cat([_resize_matrix(2, size, maps.device), torch.zeros(size, 1, device=maps.device)], dim=1)
    three = _resize_matrix(3, size, maps.device)
    a_r = torch.where((rn == 3).view(B, 1, 1), three, two)  # [B, size, 3]
    a_c = torch.where((cn == 3).view(B, 1, 1), three, two)
    pix = (a_r @ window @ a_c.transpose(1, 2)).clamp(0.0, 1.0)  # [B, size, size]
    pix = torch.where(flips.view(B, 1, 1), pix.flip(-1), pix)
    p = size // grid
    return pix.view(B, grid, p, grid, p).mean(dim=(2, 4)).reshape(B, grid * grid)


def gumbel_topk_order(weights: torch.Tensor, generator: Optional[torch.Generator] = None, eps: float = 1e-6,
                      u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row order of all L indices, distributed as sampling without replacement with
    probability proportional to ``weights`` (the Gumbel-top-k trick: sort log w + Gumbel noise).

    weights [B, L] >= 0 -> [B, L] int64. ``eps`` keeps zero-weight patches orderable (last, in
    random order) instead of producing -inf ties. ``u`` [B, L]: the uniforms to use (keyed noise,
    see masking/noise.py); else drawn from ``generator``.
    """
    if u is None:
        u = torch.rand(weights.shape, device=weights.device, generator=generator)
    u = u.clamp(1e-12, 1.0 - 1e-7)
    keys = torch.log(weights.float().clamp_min(0) + eps) - torch.log(-torch.log(u))
    return keys.argsort(dim=1, descending=True)


def amt_plan(weights: torch.Tensor, mask_ratio: float, throw_ratio: float, generator: Optional[torch.Generator] = None,
             u: Optional[torch.Tensor] = None) -> MaskPlan:
    """AMT's plan from per-patch weights [B, L]: in a weighted order, the first round(rL) patches
    are masked, the next round(tL) thrown, the rest visible (highly attended ones tend to be
    reconstructed, medium ones dropped, the least attended kept as hints)."""
    B, L = weights.shape
    visible, masked, thrown = plan_sizes(L, mask_ratio, throw_ratio)
    order = gumbel_topk_order(weights, generator, u=u)
    # MaskPlan.from_order reads [visible, masked, thrown]: reorder our [masked, thrown, visible].
    return MaskPlan.from_order(torch.cat([order[:, masked + thrown:], order[:, :masked], order[:, masked:masked + thrown]], dim=1),
                               visible, masked)

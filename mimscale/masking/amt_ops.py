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

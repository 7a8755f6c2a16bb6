"""BEiT's block-wise masking (Bao et al. 2022): masked patches come in rectangles, not alone.

Per sample, on the device: ``n`` random blocks (area in [min_block, max(min_block, M/2)] patches,
aspect ratio log-uniform in [1/a, a]) at random places of the g x g grid. Each patch's key is the
index of the first block covering it (n when none) plus U(0, 1) noise; the M smallest keys are
masked, so masks are whole blocks in order, with exactly M patches per sample (the plan stays dense).
"""
from __future__ import annotations

import math

import torch

from mimscale.masking import noise as sample_noise
from mimscale.masking.base import Masker, MaskPlan, plan_sizes


class BlockwiseMasking(Masker):
    def __init__(self, grid: int, mask_ratio: float = 0.4, min_block: int = 4, max_aspect: float = 3.0):
        super().__init__()
        self.grid, self.num_patches = grid, grid * grid
        self.num_visible, self.num_masked, _ = plan_sizes(self.num_patches, mask_ratio)
        self.min_block, self.log_aspect = min_block, math.log(max_aspect)
        self.max_block = max(min_block, self.num_masked // 2)
        self.blocks = math.ceil(self.num_masked / min_block)  # enough to cover M with the smallest blocks

    def initial_sizes(self) -> tuple[int, int, int]:
        return self.num_visible, self.num_masked, 0

    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        B, n, g, dev = images.shape[0], self.blocks, self.grid, images.device
        u = sample_noise.of(meta).rand(B, 4 * n + self.num_patches, device=dev)  # [B, 4n + L]: one draw for the plan
        u_area, u_aspect, u_top, u_left, u_key = u.split([n, n, n, n, self.num_patches], dim=1)
        area = self.min_block + u_area * (self.max_block - self.min_block)  # [B, n]
        aspect = torch.exp((u_aspect * 2 - 1) * self.log_aspect)
        h = torch.sqrt(area * aspect).round().clamp(1, g)  # [B, n] block height in patches
        w = torch.sqrt(area / aspect).round().clamp(1, g)
        top = (u_top * (g - h + 1)).floor()[..., None, None]  # [B, n, 1, 1]
        left = (u_left * (g - w + 1)).floor()[..., None, None]
        r = torch.arange(g, device=dev).view(1, 1, g, 1)
        c = torch.arange(g, device=dev).view(1, 1, 1, g)
        inside = (r >= top) & (r < top + h[..., None, None]) & (c >= left) & (c < left + w[..., None, None])  # [B, n, g, g]
        ids = torch.arange(n, device=dev, dtype=torch.float32).view(1, n, 1, 1)
        first = torch.where(inside, ids, float(n)).amin(dim=1).flatten(1)  # [B, L] first block covering each patch
        key = first + u_key
        order = torch.argsort(key, dim=1, descending=True)  # uncovered first: visible, then masked blocks
        return MaskPlan.from_order(order, self.num_visible, self.num_masked)

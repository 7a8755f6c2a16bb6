"""MAE random masking: uniform noise per patch, argsort, first (1-r)L visible, rest masked."""
from __future__ import annotations

import torch

from mimscale.masking import noise as sample_noise
from mimscale.masking.base import Masker, MaskPlan, plan_sizes


class RandomMasking(Masker):
    def __init__(self, num_patches: int, mask_ratio: float = 0.75):
        super().__init__()
        self.num_patches = num_patches
        self.mask_ratio = mask_ratio
        self.num_visible, self.num_masked, _ = plan_sizes(num_patches, mask_ratio)

    def initial_sizes(self) -> tuple[int, int, int]:
        return self.num_visible, self.num_masked, 0

    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        B = images.shape[0]
        noise = sample_noise.of(meta).rand(B, self.num_patches, device=images.device)  # [B, L]
        order = torch.argsort(noise, dim=1)  # a uniformly random permutation per sample
        return MaskPlan.from_order(order, self.num_visible, self.num_masked)

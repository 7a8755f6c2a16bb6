"""AMT masker (Liu, Gui, Luo, AAAI 2023): attention-driven masking *and throwing*.

Per batch, on the device: each sample's stored attention map (meta ``attn`` [B, g*g], looked up
by global index on the host, see amt_runtime.py) is cropped and flipped with that sample's crop
box and flip, reduced to one weight per patch of the crop, and turned into a plan by weighted
sampling without replacement (Gumbel-top-k): the first rL patches masked, the next tL thrown, the
rest visible. Batches without maps (before the first refresh) get MAE random masking at
``warmup_ratio``: every rank has the same store, so all ranks take the same branch.

``map_crop`` (masking.amt.map_crop): ``box`` crops the map with the image's crop box, as the paper
describes (amt_ops.align_maps); ``released`` reproduces the authors' released code, which reads
the map's top-left cells whatever the crop (amt_ops.align_maps_released).

``weights`` (masking.amt.weights): ``attention`` (AMT); ``uniform`` replaces the aligned maps by
ones, so the weighted order is a uniformly random permutation: the same counts masked and thrown,
chosen without attention (an ablation of what the maps add to throwing).
"""
from __future__ import annotations

from typing import Optional

import torch

from mimscale.masking import noise as sample_noise
from mimscale.masking.amt_ops import MAP_CROPS, align_maps, align_maps_released, amt_plan
from mimscale.masking.base import Masker, MaskPlan, plan_sizes
from mimscale.masking.random import RandomMasking

WEIGHTS = ("attention", "uniform")


class AMTMasking(Masker):
    def __init__(self, num_patches: int, mask_ratio: float = 0.45, throw_ratio: float = 0.40, warmup_ratio: float = 0.75,
                 map_crop: str = "box", weights: str = "attention"):
        super().__init__()
        if map_crop not in MAP_CROPS:
            raise ValueError(f"map_crop {map_crop!r}: allowed values: {', '.join(MAP_CROPS)}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights {weights!r}: allowed values: {', '.join(WEIGHTS)}")
        self.weights = weights
        self.map_crop = map_crop
        self.num_patches = num_patches
        self.grid = int(round(num_patches ** 0.5))
        if self.grid * self.grid != num_patches:
            raise ValueError(f"AMT needs a square patch grid, got {num_patches} patches")
        self.mask_ratio = mask_ratio
        self.throw_ratio = throw_ratio
        plan_sizes(num_patches, mask_ratio, throw_ratio)  # raises on ratios that leave nothing visible
        self.warmup = RandomMasking(num_patches, warmup_ratio)
        self.last_weights: Optional[torch.Tensor] = None  # [B, L] aligned weights of the last batch (for the image grid)

    def initial_sizes(self) -> tuple[int, int, int]:
        return self.warmup.initial_sizes()  # random masking until the first refresh

    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        maps = meta.get("attn")  # [B, g*g] float16, or absent before the first refresh
        if maps is None:
            self.last_weights = None
            return self.warmup(images, meta)
        B = maps.shape[0]
        g = int(round(maps.shape[1] ** 0.5))
        if self.map_crop == "released":  # stretched over the crop's pixels, as the image: its side is needed
            weights = align_maps_released(maps.view(B, g, g), meta["box"], meta["flip"], self.grid, images.shape[-1])
        else:
            weights = align_maps(maps.view(B, g, g), meta["box"], meta["flip"], self.grid)  # [B, L]
        if self.weights == "uniform":  # the maps only switched the warm-up off: every patch weighs the same
            weights = torch.ones_like(weights)
        self.last_weights = weights.detach()
        u = sample_noise.of(meta).rand(B, self.num_patches, device=weights.device)  # [B, L] Gumbel noise's uniforms
        return amt_plan(weights, self.mask_ratio, self.throw_ratio, u=u)

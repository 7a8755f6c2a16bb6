"""Encoder presets by name: five-line entries, no model code (see vit.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    dim: int
    depth: int
    heads: int
    patch_size: int
    mlp_ratio: float = 4.0


# Sizes from ViT / MAE (B/16, L/16, H/14); "2b" is a 2560-wide, 24-deep /14 model (~1.9B params).
# "giant" is ViT-g/14 of Zhai et al., "Scaling Vision Transformers" (CVPR 2022), Table 2: 1408 wide,
# 40 deep, 16 heads (88 channels each), MLP 6144 (mlp_ratio 6144 / 1408 = 48 / 11; timm's
# vit_giant_patch14_224), ~1.01B encoder params.
ENCODERS: dict[str, EncoderSpec] = {
    "vit_tiny": EncoderSpec(dim=192, depth=12, heads=3, patch_size=16),
    "vit_small": EncoderSpec(dim=384, depth=12, heads=6, patch_size=16),
    "vit_base": EncoderSpec(dim=768, depth=12, heads=12, patch_size=16),
    "vit_large": EncoderSpec(dim=1024, depth=24, heads=16, patch_size=16),
    "vit_huge": EncoderSpec(dim=1280, depth=32, heads=16, patch_size=14),
    "vit_2b": EncoderSpec(dim=2560, depth=24, heads=32, patch_size=14),
    "vit_giant": EncoderSpec(dim=1408, depth=40, heads=16, patch_size=14, mlp_ratio=6144 / 1408),
}

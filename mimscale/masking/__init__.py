"""Masking methods by name (``masking.method``)."""
from __future__ import annotations

from mimscale.masking.base import Masker, MaskPlan, plan_sizes
from mimscale.masking.random import RandomMasking

METHODS = ("random",)


def build_masker(cfg, num_patches: int) -> Masker:
    """Build the masking module named by ``cfg.masking.method``."""
    if cfg.masking.method == "random":
        return RandomMasking(num_patches, cfg.masking.mask_ratio)
    raise ValueError(f"masking.method {cfg.masking.method!r}; allowed: {', '.join(METHODS)}")


__all__ = ["Masker", "MaskPlan", "plan_sizes", "RandomMasking", "METHODS", "build_masker"]

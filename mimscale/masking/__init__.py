"""Masking methods by name (``masking.method``)."""
from __future__ import annotations

from mimscale.masking.base import Masker, MaskPlan, plan_sizes
from mimscale.masking.random import RandomMasking

METHODS = ("random", "amt")


def build_masker(cfg, num_patches: int) -> Masker:
    """Build the masking module named by ``cfg.masking.method``."""
    m = cfg.masking
    if m.method == "random":
        return RandomMasking(num_patches, m.mask_ratio)
    if m.method == "amt":
        from mimscale.masking.amt import AMTMasking

        return AMTMasking(num_patches, m.amt.mask_ratio, m.amt.throw_ratio, warmup_ratio=m.mask_ratio)
    raise ValueError(f"masking.method {m.method!r}; allowed: {', '.join(METHODS)}")


def build_runtime(cfg, trainer):
    """The method's hooks into the training loop (see amt_runtime.py), or None."""
    if cfg.masking.method == "amt":
        from mimscale.masking.amt_runtime import AMTRuntime

        return AMTRuntime(trainer)
    return None


__all__ = ["Masker", "MaskPlan", "plan_sizes", "RandomMasking", "METHODS", "build_masker", "build_runtime"]

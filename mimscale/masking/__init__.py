"""Masking methods by name (``masking.method``)."""
from __future__ import annotations

from mimscale.masking.base import LoopHooks, Masker, MaskPlan, plan_sizes
from mimscale.masking.random import RandomMasking

METHODS = ("random", "amt", "automae", "rmae", "cmae")


def build_masker(cfg, encoder) -> Masker:
    """Build the masking module named by ``cfg.masking.method`` for ``encoder`` (a ViTEncoder)."""
    m = cfg.masking
    if m.method in ("random", "rmae", "cmae"):  # R-MAE / C-MAE: the plan's two sets are the two views
        return RandomMasking(encoder.num_patches, m.mask_ratio)
    if m.method == "amt":
        from mimscale.masking.amt import AMTMasking

        return AMTMasking(encoder.num_patches, m.amt.mask_ratio, m.amt.throw_ratio, warmup_ratio=m.mask_ratio)
    if m.method == "automae":
        from mimscale.masking.automae import AutoMAEMasking
        from mimscale.masking.extractor_weights import load_encoder_state

        a = m.automae
        frozen = load_encoder_state(a.extractor_checkpoint) if a.extractor == "frozen" else None
        return AutoMAEMasking(encoder, m.mask_ratio, a.throw_ratio, a.lam, a.extractor, frozen)
    raise ValueError(f"masking.method {m.method!r}; allowed: {', '.join(METHODS)}")


def build_runtime(cfg, trainer):
    """The method's hooks into the training loop (a LoopHooks), or None."""
    m = cfg.masking
    if m.method == "amt" or (m.method == "automae" and m.automae.extractor == "stored"):
        from mimscale.masking.amt_runtime import AMTRuntime

        return AMTRuntime(trainer)
    if m.method == "automae" and m.automae.extractor == "ema":
        from mimscale.masking.ema import EMAHooks

        module = trainer.engine.module
        return EMAHooks(list(zip(module.encoder.parameters(), module.masker.ema.parameters())), m.automae.ema_decay)
    if m.method == "cmae":
        from mimscale.masking.ema import EMAHooks

        return EMAHooks(trainer.engine.module.objective.ema_pairs(), m.cmae.momentum)
    return None


__all__ = ["LoopHooks", "Masker", "MaskPlan", "plan_sizes", "RandomMasking", "METHODS", "build_masker", "build_runtime"]

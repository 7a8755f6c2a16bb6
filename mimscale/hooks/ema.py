"""EMA weights: after every optimizer step, ema <- decay * ema + (1 - decay) * online.

Both encoders live in the engine's module, so under ZeRO-3 each rank holds the same slice of
every parameter of the two (equal shapes partition alike) and updates only that slice: no
gather. The average is kept in fp32 ("shadow", this rank's part, saved with its checkpoint
state) and copied into the module's weights, because in bf16 a (1 - 0.999) step is below the
format's resolution and an in-place bf16 EMA would never move.
"""
from __future__ import annotations

from typing import Optional

import torch

from mimscale.hooks.base import LoopHooks


def persisted(p: torch.Tensor) -> bool:
    """ZeRO-3 keeps parameters under ``stage3_param_persistence_threshold`` whole on every rank
    (``p.data``) besides their partition (``ds_tensor``); forwards read the whole one."""
    return hasattr(p, "ds_tensor") and bool(getattr(p, "ds_persist", False))


def ema_view(p: torch.Tensor) -> torch.Tensor:
    """What the EMA averages for ``p``: the whole tensor when a forward reads it whole, else this rank's slice."""
    return p.data if persisted(p) or not hasattr(p, "ds_tensor") else p.ds_tensor


def write_partition(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's slice of ``whole`` into a persisted parameter's partition (what its
    checkpoint saves), as ZeRO-3 lays it out: flat, rank r holding [r n, (r + 1) n), zero-padded."""
    import torch.distributed as tdist

    part = p.ds_tensor.view(-1)
    n = part.numel()
    group = getattr(p, "ds_process_group", None)  # the partition index is the rank in the parameter's own group
    start = (tdist.get_rank(group=group) if tdist.is_initialized() else 0) * n
    chunk = whole.reshape(-1)[start:start + n]
    part[:chunk.numel()].copy_(chunk)


class EMAHooks(LoopHooks):
    """target <- decay * target + (1 - decay) * online for each (online, target) parameter pair
    (AutoMAE's EMA extractor; C-MAE's target encoder, projector and mask token)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float):
        self.decay = decay
        self.pairs = pairs
        def full_shape(t):  # a ZeRO-3 parameter's own .shape is its (empty) local placeholder
            return tuple(getattr(t, "ds_shape", t.shape))

        mixed = [i for i, (p, e) in enumerate(pairs) if persisted(p) != persisted(e) or full_shape(p) != full_shape(e)]
        if mixed:  # e.g. a stage3_model_persistence_threshold reached between the online and the target copy
            raise ValueError(f"EMA pairs {mixed[:5]} differ in shape or ZeRO-3 persistence; raise "
                             "stage3_model_persistence_threshold or set stage3_param_persistence_threshold to 0")
        self.shadow: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.shadow is None:
            self.shadow = [ema_view(e).detach().float().clone() for _, e in self.pairs]
        for (p, e), sh in zip(self.pairs, self.shadow):
            sh.lerp_(ema_view(p).float(), 1.0 - self.decay)
            ema_view(e).copy_(sh)
            if persisted(e):  # the whole copy was updated: keep the partition (saved) in step
                write_partition(e, e.data)

    def rank_state_dict(self) -> dict:
        return {"ema_shadow": self.shadow}  # this rank's slices: saved per rank

    def load_rank_state_dict(self, state: dict) -> None:
        shadow = state.get("ema_shadow")
        # None (a checkpoint from before the first step, or another world size): restart the
        # fp32 average from the EMA weights the checkpoint restored
        self.shadow = None if shadow is None else [s.to(ema_view(e).device) for s, (_, e) in zip(shadow, self.pairs)]

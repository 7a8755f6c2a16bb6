"""AutoMAE's EMA extractor: after every optimizer step, ema <- decay * ema + (1 - decay) * encoder.

Both encoders live in the engine's module, so under ZeRO-3 each rank holds the same slice of
every parameter of the two (equal shapes partition alike) and updates only that slice: no
gather. The average is kept in fp32 ("shadow", this rank's part, saved with its checkpoint
state) and copied into the module's weights, because in bf16 a (1 - 0.999) step is below the
format's resolution and an in-place bf16 EMA would never move.
"""
from __future__ import annotations

from typing import Optional

import torch

from mimscale.masking.base import LoopHooks


def local_data(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMAHooks(LoopHooks):
    def __init__(self, trainer):
        module = trainer.engine.module
        self.decay = trainer.cfg.masking.automae.ema_decay
        self.pairs = list(zip(module.encoder.parameters(), module.masker.ema.parameters()))
        self.shadow: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.shadow is None:
            self.shadow = [local_data(e).detach().float().clone() for _, e in self.pairs]
        for (p, e), sh in zip(self.pairs, self.shadow):
            sh.lerp_(local_data(p).float(), 1.0 - self.decay)
            local_data(e).copy_(sh)

    def rank_state(self) -> dict:
        return {"ema_shadow": self.shadow}

    def restore(self, client: dict, rank_state: dict) -> None:
        shadow = rank_state.get("ema_shadow")
        # None (a checkpoint from before the first step, or another world size): restart the
        # fp32 average from the EMA weights the checkpoint restored
        self.shadow = None if shadow is None else [s.to(local_data(e).device) for s, (_, e) in zip(shadow, self.pairs)]

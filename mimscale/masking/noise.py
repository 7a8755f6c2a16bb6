"""Random numbers for one micro batch that do not depend on how the global batch is split.

A step's global batch of G samples is dealt to (micro step j, rank r) in chunks of the micro
batch m, chunk j * world + r (mimscale/data/sampler.py): a sample's position p in the global
batch is the same on 1 rank or 64. Each random draw a method makes (MAE's per-patch noise, AMT's
Gumbel noise, AutoMAE's Gumbel-softmax and token-scale noise, C-MAE's colour jitter) takes rows
[offset, offset + B) of one draw of shape [G, ...] from a generator keyed by (seed, step, draw
number). Sample p then gets the same numbers whatever the world size, micro batch or
accumulation, and a resumed run draws what an uninterrupted one would have: the masks of a step
are a function of the recipe alone.

The draw costs G x (numbers per sample) per micro batch on the device: 4096 x 196 floats for
ViT-B/16's masks, microseconds on a GPU. Without a key (benchmarks, evaluation, unit tests that
call a masker directly) the draws come from torch's global generator, as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class SampleNoise:
    """Keyed noise for the rows [offset, offset + B) of a step's global batch; ``None`` fields:
    unkeyed (torch's global generator)."""

    seed: Optional[int] = None
    step: int = 0
    offset: int = 0  # the micro batch's first position in the global batch
    global_batch: int = 0  # G
    draws: int = field(default=0, compare=False)  # draws made so far this micro batch (each gets its own key)

    @property
    def keyed(self) -> bool:
        return self.seed is not None

    def _generator(self, device: torch.device) -> torch.Generator:
        # (seed, step, draw) hashed together: step s + 1 must not replay step s's second draw
        key = int(np.random.SeedSequence([self.seed, self.step, self.draws, 0x4D494D]).generate_state(1, dtype=np.uint64)[0] >> 1)
        self.draws += 1
        return torch.Generator(device=device).manual_seed(key)

    # Not traced by torch.compile: the key changes every step, and a traced draw would be guarded on
    # it (a recompile per step); the draw itself is one kernel either way.
    @torch.compiler.disable
    def rand(self, batch: int, *shape: int, device=None) -> torch.Tensor:
        """[batch, *shape] float32 uniforms in [0, 1): this micro batch's rows of a [G, *shape] draw."""
        if not self.keyed:
            return torch.rand(batch, *shape, device=device)
        if self.offset + batch > self.global_batch:
            raise ValueError(f"micro batch rows {self.offset}..{self.offset + batch} exceed the global batch {self.global_batch}")
        full = torch.rand(self.global_batch, *shape, device=device, generator=self._generator(torch.device(device or "cpu")))
        return full[self.offset:self.offset + batch]


def of(meta: Optional[dict]) -> SampleNoise:
    """The batch's noise (the trainer puts it in ``meta['noise']``), else unkeyed."""
    noise = (meta or {}).get("noise")
    return noise if isinstance(noise, SampleNoise) else SampleNoise()


def gumbel_softmax(logits: torch.Tensor, u: torch.Tensor, tau: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Soft Gumbel-softmax of ``logits`` with the uniforms ``u`` (same shape) as its noise.
    torch's F.gumbel_softmax draws its noise from the global generator, which cannot be keyed
    per sample; this is the same sample (g = -log(-log u)) from the noise given."""
    g = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-7)))
    return torch.softmax((logits + g.to(logits.dtype)) / tau, dim=dim)

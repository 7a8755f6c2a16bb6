"""The loop-hook protocol and the small context a hook sees (instead of the whole Trainer)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mimscale.runtime.stateful import Stateful


@dataclass
class LoopContext:
    """What the loop hands a method's hooks: the run's facts and the few services they use."""

    cfg: Any  # the run's Config
    engine: Any  # the DeepSpeed engine (``engine.module`` is the MIMModel)
    micro_batch: int  # per rank
    zero_stage: int
    source: Any  # the training source (len() = samples per epoch)
    out: Path  # output_dir
    rank: int
    world: int
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    num_patches: int
    log_metrics: Callable[[dict, int], None]  # rank 0's tracker (a no-op elsewhere)
    mean_step_seconds: Callable[[], Optional[float]]  # training speed so far (None before the first log step)


class LoopHooks(Stateful):
    """A method's side of the training loop; the Trainer calls these on every rank in the same
    order. The defaults do nothing, so a method without hooks gets ``LoopHooks()`` and the loop
    never asks whether there are any. State goes through the Stateful methods (registered with
    the checkpointer as part ``method``)."""

    def before_step(self, step: int) -> float:
        """Before optimizer step ``step`` + 1; returns seconds spent (not billed to training)."""
        return 0.0

    def after_optimizer_step(self) -> None:
        """After the engine applied an optimizer step."""

    def prime(self) -> Optional[float]:
        """Bring the method's state to its steady form now, outside the schedule (a benchmark of
        steady steps calls it once); seconds spent, or None when there is nothing to prime."""
        return None

    def host_inputs(self, batch: dict) -> dict:
        """Extra CPU tensors for the batch's meta, moved to the device with it."""
        return {}

    def marker_extra(self) -> dict:
        """Small facts written into a checkpoint's completion marker (readable without loading it)."""
        return {}

    def after_save(self) -> None:
        """After a checkpoint was saved."""

    def summary(self) -> dict:
        """Entries for the run's summary.json."""
        return {}

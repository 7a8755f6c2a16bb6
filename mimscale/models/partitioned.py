"""Building a model whose parameters ZeRO-3 partitions as they are created (``deepspeed.zero.Init``).

Under zero.Init every module's parameters are cut into per-rank shards as soon as that module's
``__init__`` returns, so no rank ever holds the whole model (a 2B encoder is 7.7 GB in fp32). Code
that sets weights after a submodule was built (MAE's xavier init of every Linear, the patch
embedding's init) must first gather that module's shards (``gathered``): one module at a time, so
the peak stays one layer, and the draws from the RNG are the same as without partitioning, so the
weights are too (modifier rank 0's values are kept; every rank computes the same ones).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """A parameter that zero.Init partitioned (its data is a placeholder; ``ds_shape`` is its shape)."""
    return hasattr(p, "ds_id")


def gathered(params: Iterable[torch.Tensor]):
    """Context in which ``params`` hold their whole values, and changes made to them are kept (rank
    0's, re-partitioned on exit); a no-op for parameters that are not partitioned."""
    ps = [p for p in params if is_partitioned(p)]
    if not ps:
        return nullcontext()
    import deepspeed  # only under ZeRO-3: the models layer imports nothing of the engine otherwise

    return deepspeed.zero.GatheredParameters(ps, modifier_rank=0)

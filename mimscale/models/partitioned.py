"""Building a model whose parameters ZeRO-3 partitions as they are created (``deepspeed.zero.Init``).

Under zero.Init every module's parameters are cut into per-rank shards as soon as that module's
``__init__`` returns, so no rank ever holds the whole model (a 2B encoder is 7.7 GB in fp32). Code
that sets weights after a submodule was built (MAE's xavier init of every Linear, the patch
embedding's init) must first gather that module's shards (``gathered``): one module at a time, so
the peak stays one layer, and the draws from the RNG are the same as without partitioning, so the
weights are too (modifier rank 0's values are kept; every rank computes the same ones).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch
from torch import nn


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


def frozen_copy(module: nn.Module, build: Optional[Callable[[], nn.Module]]) -> nn.Module:
    """A copy of ``module`` that takes no gradients (an EMA target, C-MAE's target branch).

    A whole module is deep-copied. A module zero.Init partitioned cannot be (its parameters are
    placeholders bound to DeepSpeed's bookkeeping): ``build()`` makes a twin of the same structure
    (inside the caller's zero.Init, so the twin is born partitioned too; with the RNG streams
    forked, so the draws of what is built after it do not move), then each parameter is copied
    gathered, one at a time (the peak stays one tensor), and the buffers as they are."""
    params = list(module.parameters())
    if not any(is_partitioned(p) for p in params):
        return copy.deepcopy(module).requires_grad_(False)
    if build is None:
        raise ValueError(f"a copy of the partitioned {type(module).__name__} needs its constructor (build)")
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        twin = build()
    names = [n for n, _ in module.named_parameters()]
    twin_named = list(twin.named_parameters())
    if names != [n for n, _ in twin_named]:
        raise ValueError(f"frozen_copy: build() made another structure ({len(twin_named)} parameters, {len(names)} expected)")
    for p, (_, q) in zip(params, twin_named):
        with gathered([p, q]), torch.no_grad():
            q.data.copy_(p.data)
    for b, c in zip(module.buffers(), twin.buffers()):
        c.data.copy_(b.data)
    return twin.requires_grad_(False)

"""R-MAE and C-MAE inside a DeepSpeed engine under one ZeRO stage against plain torch: ``check``,
run on 2 ranks by tests/integration/zero_checks.py for each stage in turn.

For each method: one forward/backward on each rank's own batch; the engine's averaged gradients
must equal the average over both ranks' batches of the plain model's gradients (same seeds, so
the same masks and colour jitter). Then C-MAE takes an optimizer step and its EMA hook runs: the
target's gathered weights must equal decay * before + (1 - decay) * the online weights after the
step, and no target parameter may hold a gradient.
"""
from __future__ import annotations

import copy

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from mimscale.hooks.ema import EMAHooks
from mimscale.runtime import dist
from tests.conftest import tiny_model

DECAY = 0.5


def batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, {"box": torch.rand(3, 4, generator=g).sort(1).values, "flip": torch.zeros(3, dtype=torch.bool),
                    "index": torch.arange(3)}


def gathered(params) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().clone().float() for p in params]


def cmae_keys_replay(ref):
    """C-MAE's negatives are every rank's keys: the single-process reference first records each
    rank's target keys (same seeds, so the same views), then gives rank r's forward all of them,
    with r's rows first at r * B, as the engine's all-gather does. Returns ``select(r)``."""
    obj = ref.objective
    keys: dict[int, list[torch.Tensor]] = {}
    current = {"rank": 0}

    def record(k):
        keys.setdefault(current["rank"], []).append(k.detach().clone())
        return k, 0

    obj.gather_keys = record
    with torch.no_grad():
        for r in range(dist.world_size()):
            current["rank"] = r
            torch.manual_seed(100 + r)
            ref(*batch(r))
    calls = iter(())

    def replay(k):
        view = next(calls)
        return torch.cat([keys[q][view] for q in range(dist.world_size())]), current["rank"] * k.shape[0]

    def select(r: int) -> None:
        nonlocal calls
        current["rank"] = r
        calls = iter(range(2))
        obj.gather_keys = replay

    return select


def check(method: str, stage: int) -> dict:
    model = tiny_model(method)  # built after torch.manual_seed(0)
    ref = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    rank = dist.rank()
    torch.manual_seed(100 + rank)
    loss, terms = engine(*batch(rank))
    engine.backward(loss)
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    got = {n: (g.detach().clone().float() if g is not None else None) for n, g in got.items()}
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    expect = {n: torch.zeros_like(p) for n, p in params}
    replay = cmae_keys_replay(ref) if method == "cmae" else None
    for r in range(dist.world_size()):
        torch.manual_seed(100 + r)
        if replay is not None:
            replay(r)
        total, _ = ref(*batch(r))
        for (n, _), g in zip(params, torch.autograd.grad(total, [p for _, p in params], allow_unused=True)):
            if g is not None:
                expect[n] += g / dist.world_size()
    diff = {n: float((got[n] - expect[n]).abs().max()) if got[n] is not None else float("inf") for n in expect}
    scale = {n: float(expect[n].abs().max()) for n in expect}
    out = {"diff": diff, "scale": scale, "terms": sorted(terms), "loss": float(loss)}
    if method == "cmae":
        obj = engine.module.objective
        hooks = EMAHooks(obj.ema_pairs(), DECAY)
        online = [p for p, _ in hooks.pairs]
        target = [t for _, t in hooks.pairs]
        before = gathered(target)
        engine.step()
        hooks.after_optimizer_step()
        after_online, after_target = gathered(online), gathered(target)
        err = max(float((t - (DECAY * b + (1 - DECAY) * o)).abs().max()) for b, o, t in zip(before, after_online, after_target))
        moved = max(float((t - b).abs().max()) for b, t in zip(before, after_target))
        target_names = [n for n, _ in engine.module.named_parameters() if n.startswith("objective.target_")]
        out.update(ema_error=err, target_moved=moved, n_target=len(target_names),
                   target_trainable=[n for n, p in engine.module.named_parameters() if n.startswith("objective.target_") and p.requires_grad],
                   target_in_optimizer=sum(any(p is q for g in opt.param_groups for q in g["params"])
                                           for n, p in engine.module.named_parameters() if n.startswith("objective.target_")))
    return out

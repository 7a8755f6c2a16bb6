"""AutoMAE's one-backward gradients inside a DeepSpeed engine under one ZeRO stage against a
plain-torch reference with one backward per term: ``check``, run on 2 ranks by
tests/integration/zero_checks.py for each stage in turn.

Each rank trains on its own batch; the engine averages gradients over ranks, so the reference is
the average over both ranks' batches of: grad L_rec (MAE + G) + grad lambda (D(m)-1)^2 (G only)
+ grad (D(real)-1)^2 + D(sg(m))^2 (D only). ``check`` returns {"diff": {parameter: max
|difference|}, "scale": {parameter: max |reference gradient|}, "d_persistent": {...}}.
"""
from __future__ import annotations

import copy

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

import mimscale.masking.automae as automae
from mimscale.runtime import dist
from tests.conftest import tiny_model


def batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, {"box": torch.rand(3, 4, generator=g).sort(1).values, "flip": torch.tensor([True, False, True]),
                    "index": torch.arange(3)}


def check(stage: int) -> dict:
    model = tiny_model("automae", "masking.automae.throw_ratio=0.125")  # built after torch.manual_seed(0)
    model.masker.discriminator.eval()  # one fixed spectral normalization for engine and reference
    ref = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    rank = dist.rank()
    torch.manual_seed(100 + rank)
    loss, _ = engine(*batch(rank))
    engine.backward(loss)
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    got = {n: (g.detach().clone().float() if g is not None else None) for n, g in got.items()}

    seen = {}
    real_terms = automae.lsgan_terms

    def spy(d_real, d_sg, d_gen, lam):
        seen.update(d_real=d_real, d_sg=d_sg, d_gen=d_gen, lam=lam)
        return real_terms(d_real, d_sg, d_gen, lam)

    automae.lsgan_terms = spy  # for the reference's forwards only; put back below
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    expect = {n: torch.zeros_like(p) for n, p in params}
    G = list(ref.masker.generator.parameters())
    D = list(ref.masker.discriminator.parameters())
    mae = [p for n, p in params if not n.startswith("masker.")]
    names = {id(p): n for n, p in params}
    for r in range(dist.world_size()):
        torch.manual_seed(100 + r)
        total, _ = ref(*batch(r))
        rec = total - ref.last_plan.aux_loss
        for ps, term in ((mae + G, rec), (G, seen["lam"] * (seen["d_gen"] - 1).pow(2).mean()),
                         (D, (seen["d_real"] - 1).pow(2).mean() + seen["d_sg"].pow(2).mean())):
            for p, g in zip(ps, torch.autograd.grad(term, ps, retain_graph=True, allow_unused=True)):
                if g is not None:
                    expect[names[id(p)]] += g / dist.world_size()
    automae.lsgan_terms = real_terms
    diff = {n: float((got[n] - expect[n]).abs().max()) if got[n] is not None else float("inf") for n in expect}
    scale = {n: float(expect[n].abs().max()) for n in expect}
    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (default 1e5 elements) whole
    # on every rank: the discriminator (8.7k at 14 x 14) is never split into slivers
    persist = {n: bool(getattr(p, "ds_persist", False)) for n, p in engine.module.masker.discriminator.named_parameters()}
    return {"diff": diff, "scale": scale, "d_persistent": persist}

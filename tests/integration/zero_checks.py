"""Run under ``deepspeed --num_gpus 2 tests/integration/zero_checks.py <stages> <out.json>``: the 2-rank
checks of a DeepSpeed engine against plain torch, under each ZeRO stage of ``stages`` ("1,2,3") in
turn, in one process group (one launch; every check builds its own model and engine):

  views    R-MAE's and C-MAE's gradients and C-MAE's EMA target (views_zero.py)
  automae  AutoMAE's one-backward gradient routing against one backward per term (automae_grads.py)
  amt      AMT's CLS-attention pass, what a store refresh computes through the engine's encoder
           (under ZeRO-3 its module hooks gather the parameters), against the plain encoder's

Rank 0 writes {stage: {"views": {method: result}, "automae": result, "amt": result}} as JSON.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from mimscale.runtime import dist  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.integration import automae_grads, views_zero  # noqa: E402


def amt_attention(stage: int) -> dict:
    model = tiny_model("amt")  # built after torch.manual_seed(0): the same weights on both ranks
    ref = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    module = engine.module
    partitioned = module.encoder.cls_token.numel() == 0  # ZeRO-3: a placeholder outside the forward
    g = torch.Generator().manual_seed(20 + dist.rank())  # each rank its own images
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        got = module.encoder(module.normalize(images), cls_attention=True)
        want = ref.encoder(ref.normalize(images), cls_attention=True)
    diff = torch.tensor([float((got - want).abs().max())])
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)  # the worst of both ranks
    return {"diff": float(diff), "shape": list(got.shape), "partitioned": partitioned,
            "min": float(want.min()), "max": float(want.max()), "spread": float((want.max(1).values - want.min(1).values).min())}


def main(stages: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_distributed()
    result = {str(stage): {"views": {m: views_zero.check(m, stage) for m in ("rmae", "cmae")},
                           "automae": automae_grads.check(stage), "amt": amt_attention(stage)} for stage in stages}
    if dist.rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main([int(s) for s in args[0].split(",")], args[1])

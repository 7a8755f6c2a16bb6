"""Run under ``deepspeed --num_gpus 2 tests/integration/zero_init_check.py 3 <out.json>``: the model
built as the Trainer builds it under ZeRO-3 (inside deepspeed.zero.Init), against the same model
built whole.

  bytes      this rank's parameter bytes after the build (its shards) and the whole model's
  peak       the most parameter bytes this rank held at once during each build
  max_diff   the largest difference between the gathered partitioned weights (and the buffers)
             and the whole build's (the same RNG draws: 0.0 expected)

for MAE, C-MAE (its target branch) and AutoMAE with the EMA extractor (its discriminator too).

A ViT-Base encoder and decoder at 32 px: 110 M parameters, 0.4 GB in fp32, enough to see the
halving in the resident memory above the noise. Rank 0 writes {method: [result per rank]} as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from mimscale import methods  # noqa: E402
from mimscale.config import load_config  # noqa: E402
from mimscale.runtime import dist  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


class PeakParameterBytes:
    """The most bytes the parameters built so far held at once while the block runs: summed at
    every parameter registration (torch's global hook), when the previous modules' ``__init__``
    has returned and zero.Init has partitioned them (a shard in ``ds_tensor``, a placeholder in
    ``data``), and once more at the end."""

    def __enter__(self):
        self.params, self.peak = [], 0
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(self._on_register)
        return self

    def _held(self) -> int:
        total = 0
        for p in self.params:
            total += p.data.numel() * p.element_size()
            if hasattr(p, "ds_tensor"):
                total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        return total

    def _on_register(self, module, name, param):
        if param is not None:
            self.peak = max(self.peak, self._held())
            self.params.append(param)

    def __exit__(self, *exc):
        self.handle.remove()
        self.peak = max(self.peak, self._held())


# every method's model: C-MAE's target branch and AutoMAE's EMA extractor are partitioned twins
# filled from the online encoder, AutoMAE's discriminator registers its spectral norm gathered
CASES = {"mae": [], "cmae": ["masking.method=cmae"],
         "automae_ema": ["masking.method=automae", "masking.automae.extractor=ema"]}


def check(sets: list[str]) -> dict:
    cfg = load_config(None, ["model.name=vit_base", "model.img_size=32", "model.patch_size=8", *sets])
    dist.seed_all(cfg.train.seed)
    with PeakParameterBytes() as peak_part, deepspeed.zero.Init(config_dict_or_path=DS, enabled=True):
        part = methods.build_model(cfg)
    params = list(part.parameters())
    mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    whole_bytes = sum(p.ds_numel * p.element_size() for p in params)
    dist.seed_all(cfg.train.seed)
    with PeakParameterBytes() as peak_whole:
        whole = methods.build_model(cfg)
    diffs = {}
    for (n, p), q in zip(part.named_parameters(), whole.parameters()):
        with deepspeed.zero.GatheredParameters([p]):
            diffs[n] = float((p.data - q.data).abs().max())
    for (n, b), (_, c) in zip(part.named_buffers(), whole.named_buffers()):  # spectral norm's u, v; positions
        diffs[n] = float((b.float() - c.float()).abs().max())
    max_diff = max(diffs.values())
    worst = max(diffs, key=diffs.get)
    return {"rank": dist.rank(), "bytes": mine, "whole_bytes": whole_bytes, "peak_partitioned": peak_part.peak,
            # a deep copy (the whole build's C-MAE target, AutoMAE's EMA) registers no parameter: the
            # whole model at the end counts it
            "peak_whole": max(peak_whole.peak, sum(q.numel() * q.element_size() for q in whole.parameters())), "max_diff": max_diff,
            "worst": worst}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_distributed()
    results = {}
    for name, sets in CASES.items():
        result = check(sets)
        gathered = [None] * dist.world_size()
        tdist.all_gather_object(gathered, result)
        results[name] = gathered
    if dist.rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[-1])

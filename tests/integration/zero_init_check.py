"""Run under ``deepspeed --num_gpus 2 tests/integration/zero_init_check.py 3 <out.json>``: the model
built as the Trainer builds it under ZeRO-3 (inside deepspeed.zero.Init), against the same model
built whole.

  bytes      this rank's parameter bytes after the build (its shards) and the whole model's
  peak       the most parameter bytes this rank held at once during each build
  max_diff   the largest difference between the gathered partitioned weights and the whole
             build's (the same RNG draws: 0.0 expected)

A ViT-Base encoder and decoder at 32 px: 110 M parameters, 0.4 GB in fp32, enough to see the
halving in the resident memory above the noise. Rank 0 writes {rank: result} as JSON.
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


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_distributed()
    cfg = load_config(None, ["model.name=vit_base", "model.img_size=32", "model.patch_size=8"])
    dist.seed_all(cfg.train.seed)
    with PeakParameterBytes() as peak_part, deepspeed.zero.Init(config_dict_or_path=DS, enabled=True):
        part = methods.build_model(cfg)
    params = list(part.parameters())
    mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    whole_bytes = sum(p.ds_numel * p.element_size() for p in params)
    dist.seed_all(cfg.train.seed)
    with PeakParameterBytes() as peak_whole:
        whole = methods.build_model(cfg)
    max_diff = 0.0
    for p, q in zip(part.parameters(), whole.parameters()):
        with deepspeed.zero.GatheredParameters([p]):
            max_diff = max(max_diff, float((p.data - q.data).abs().max()))
    result = {"rank": dist.rank(), "bytes": mine, "whole_bytes": whole_bytes, "peak_partitioned": peak_part.peak,
              "peak_whole": peak_whole.peak, "max_diff": max_diff}
    gathered = [None] * dist.world_size()
    tdist.all_gather_object(gathered, result)
    if dist.rank() == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[-1])

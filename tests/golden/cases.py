"""The golden runs: which presets, overrides and ZeRO stages the stored loss curves come from.

Every case is a real pretraining run (the Trainer, DeepSpeed engine, data stream, masker and loop
hooks a user gets) on 2 CPU ranks in fp32 with a fixed seed, 20 optimizer steps of micro batch 4 x
accumulation 2, synthetic images at 32 px (patch 8: 16 patches). fp32 on CPU with one thread per
rank and gloo's 2-rank all-reduce is deterministic, so the curves are compared exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIGS = REPO / "mimscale" / "configs"
STEPS = 20
STAGES = (1, 3)
MICRO, ACCUM = 4, 2

COMMON = [
    f"train.steps={STEPS}", "train.warmup_steps=3", "train.log_every=1", "train.ckpt_every=1000", "train.seed=0",
    "model.img_size=32", "model.patch_size=8", "model.decoder_dim=64", "model.decoder_depth=1", "model.decoder_heads=4",
    "data.source=synthetic", "data.synthetic_count=256", "data.synthetic_size=48", "data.num_workers=1",
    "tracking.enabled=false", "tracking.mask_grid_every=0", "tracking.cka_every_epochs=0", "resume=never",
]

# name -> (preset, extra overrides)
CASES = {
    "mae": ("mae_vit_tiny_cpu.yaml", []),
    # 16 steps per epoch here: refreshes before steps 5 and 15 (25% of the run, then every 50%),
    # random masking before the first
    "amt": ("amt_vit_tiny_cpu.yaml", ["masking.amt.first_refresh=25%", "masking.amt.refresh_every=50%"]),
    "automae_online": ("automae_vit_tiny_cpu.yaml", ["masking.automae.extractor=online"]),
    # AMT's store as the extractor: refreshed before steps 0 and 10
    "automae_stored": ("automae_vit_tiny_cpu.yaml", ["masking.automae.extractor=stored", "masking.amt.first_refresh=0",
                                                      "masking.amt.refresh_every=50%"]),
}


def golden_file(stage: int) -> Path:
    return HERE / f"zero{stage}.json"


def ds_config(stage: int, path: Path) -> Path:
    cfg = json.loads((REPO / "ds_configs" / f"cpu_fp32_zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=ACCUM)
    path.write_text(json.dumps(cfg))
    return path

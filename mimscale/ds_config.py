"""The DeepSpeed JSON: engine concerns only (micro batch, accumulation, precision, ZeRO, clipping).

mimscale builds the optimizer and LR schedule in Python so one code path serves every masking
method; a JSON that also defines them is rejected rather than silently having one side ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mimscale.config import ConfigError

OWNED_BY_YAML = {
    "optimizer": "the optimizer is built in Python from the YAML's train.* keys (AdamW, param groups)",
    "scheduler": "the LR schedule (warmup + half-cycle cosine) is built in Python from the YAML's train.* keys",
}


@dataclass
class EngineSettings:
    """What the trainer needs to know from the JSON, with batch sizes resolved for a world size."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    zero_stage: int
    bf16: bool
    fp16: bool
    clip: float
    raw: dict

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def load_ds_config(path: str | Path, world_size: int) -> EngineSettings:
    """Read and check a ds_config for ``world_size`` ranks; raise ConfigError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {e}") from None
    return check_ds_config(raw, world_size, name=str(path))


def _section(raw: dict, key: str, name: str) -> dict:
    sec = raw.get(key, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{name}: '{key}' must be an object, got {sec!r}")
    return sec


def check_ds_config(raw: dict, world_size: int, name: str = "ds_config") -> EngineSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a JSON object at the top level, got {type(raw).__name__}")
    for key, why in OWNED_BY_YAML.items():
        if key in raw:
            raise ConfigError(f"{name} defines '{key}', which mimscale does not take from the JSON: {why}. Remove it.")
    micro = raw.get("train_micro_batch_size_per_gpu")
    accum = raw.get("gradient_accumulation_steps")
    total = raw.get("train_batch_size")
    for key, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum), ("train_batch_size", total)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"{name}: '{key}' must be a positive integer, got {v!r}")
    if micro is None and total is None:
        raise ConfigError(f"{name}: set 'train_micro_batch_size_per_gpu' (and optionally 'gradient_accumulation_steps')")
    if micro is None:
        accum = accum or 1  # DeepSpeed's rule: train_batch_size alone means no accumulation
        if total % (accum * world_size):
            raise ConfigError(
                f"{name}: train_batch_size {total} is not divisible by gradient_accumulation_steps {accum} x world size {world_size}"
            )
        micro = total // (accum * world_size)
    if accum is None:
        if total is None:
            accum = 1
        elif total % (micro * world_size):
            raise ConfigError(
                f"{name}: train_batch_size {total} is not divisible by micro batch {micro} x world size {world_size}"
            )
        else:
            accum = total // (micro * world_size)
    if total is None:
        total = micro * accum * world_size
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{name}: batch sizes do not add up: train_batch_size {total} != micro batch {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size} = {micro * accum * world_size}"
        )
    zero = _section(raw, "zero_optimization", name).get("stage", 0)
    if zero not in (0, 1, 2, 3) or isinstance(zero, (bool, float)):
        raise ConfigError(f"{name}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero!r}")
    flags = {}
    for key in ("bf16", "fp16"):
        enabled = _section(raw, key, name).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{name}: '{key}.enabled' must be true or false, got {enabled!r}")
        flags[key] = enabled
    bf16, fp16 = flags["bf16"], flags["fp16"]
    if bf16 and fp16:
        raise ConfigError(f"{name}: enable at most one of bf16 and fp16")
    if fp16:  # DeepSpeed skips the optimizer (and the LR scheduler) on overflow steps, which the loop,
        # AMT's refresh schedule and the EMA hooks would count as taken: refused rather than half right
        raise ConfigError(f"{name}: fp16 is not supported (loss-scale overflow steps are skipped by DeepSpeed but counted "
                          "by mimscale's schedules); use bf16 (\"bf16\": {\"enabled\": true}) on GPUs, fp32 on CPUs")
    clip = raw.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{name}: 'gradient_clipping' must be a number >= 0, got {clip!r}")
    clip = float(clip)
    return EngineSettings(micro, accum, total, zero, bf16, fp16, clip, raw)

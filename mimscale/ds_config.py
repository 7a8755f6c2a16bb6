"""The DeepSpeed JSON: engine concerns only (micro batch, precision, ZeRO).

mimscale builds the optimizer and LR schedule in Python so one code path serves every masking
method; a JSON that also defines them is rejected rather than silently having one side ignored.

The global batch belongs to the recipe (the YAML's ``train.global_batch``), not to the hardware:
the JSON says the micro batch per device, and the accumulation is derived as
global / (micro x world). A world size that does not divide the global batch is refused with the
nearest world sizes and micro batches that do. Without ``train.global_batch`` the JSON's own
batch settings decide (micro x accumulation x world: the batch then grows with the world size).

Gradient clipping is a recipe choice too (SimMIM clips at 5, MAE not at all), so the YAML's
``train.clip_grad`` owns it and is written into the JSON DeepSpeed gets as ``gradient_clipping``.
A JSON that sets a different non-zero value is refused (two owners disagreeing); its own value
applies only when the recipe leaves ``train.clip_grad`` null.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mimscale import shipped
from mimscale.errors import ConfigError

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


def load_ds_config(path: str | Path, world_size: int, global_batch: Optional[int] = None,
                   micro_batch: Optional[int] = None, clip_grad: Optional[float] = None) -> EngineSettings:
    """Read and check a ds_config for ``world_size`` ranks (and the recipe's ``global_batch``, a
    ``micro_batch`` that replaces the JSON's, and the recipe's ``clip_grad``, if set); raise
    ConfigError with the reason."""
    path = shipped.resolve_ds_config(path)  # a file, or a shipped ds_config's name (gpu_bf16_zero1)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {e}") from None
    if micro_batch is not None and isinstance(raw, dict):
        raw = {**raw, "train_micro_batch_size_per_gpu": micro_batch}
    return check_ds_config(raw, world_size, name=str(path), global_batch=global_batch, clip_grad=clip_grad)


def _section(raw: dict, key: str, name: str) -> dict:
    sec = raw.get(key, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{name}: '{key}' must be an object, got {sec!r}")
    return sec


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(values: list[int], target: int, k: int = 2) -> list[int]:
    """Up to k values just below and k just above ``target`` (sorted)."""
    below = [v for v in values if v <= target][-k:]
    above = [v for v in values if v > target][:k]
    return below + above


def batch_alternatives(global_batch: int, micro: int, world_size: int) -> str:
    """What would work instead of micro x world for ``global_batch``: the nearest world sizes with
    this micro batch, and the micro batches that work on this world size."""
    parts = []
    if global_batch % micro == 0:
        worlds = _nearest(_divisors(global_batch // micro), world_size)
        parts.append(f"world sizes near {world_size} that work with micro batch {micro}: "
                     + ", ".join(f"{w} (accumulation {global_batch // (micro * w)})" for w in worlds))
    else:
        parts.append(f"micro batch {micro} does not divide it on any world size")
    if global_batch % world_size == 0:
        micros = _nearest(_divisors(global_batch // world_size), micro)
        parts.append(f"micro batches that work on {world_size} ranks (--set train.micro_batch=M): "
                     + ", ".join(f"{m} (accumulation {global_batch // (m * world_size)})" for m in micros))
    else:
        worlds = _nearest(_divisors(global_batch), world_size)
        parts.append(f"no micro batch works on {world_size} ranks (it does not divide {global_batch}); "
                     f"world sizes near it that divide it: {', '.join(map(str, worlds))}")
    return "; ".join(parts)


def _recipe_batch(raw: dict, name: str, world_size: int, global_batch: int, micro, accum, total) -> tuple[int, int]:
    """(micro, accumulation) for the recipe's global batch: the JSON gives the micro batch; any
    accumulation or train_batch_size it also gives must agree."""
    if micro is None:
        raise ConfigError(f"{name}: set 'train_micro_batch_size_per_gpu' (the recipe's train.global_batch = {global_batch} "
                          "fixes the rest: accumulation = global / (micro x world))")
    if total is not None and total != global_batch:
        raise ConfigError(f"{name} sets train_batch_size {total} but the recipe's train.global_batch is {global_batch}: "
                          "remove train_batch_size from the JSON (the recipe owns the global batch) or make them agree")
    if global_batch % (micro * world_size):
        raise ConfigError(f"train.global_batch {global_batch} is not divisible by micro batch {micro} x world size {world_size} "
                          f"= {micro * world_size}: {batch_alternatives(global_batch, micro, world_size)}")
    derived = global_batch // (micro * world_size)
    if accum is not None and accum != derived:
        raise ConfigError(f"{name} sets gradient_accumulation_steps {accum}, but train.global_batch {global_batch} over micro "
                          f"batch {micro} x {world_size} ranks needs {derived}: remove it from the JSON (it is derived)")
    return micro, derived


def check_ds_config(raw: dict, world_size: int, name: str = "ds_config", global_batch: Optional[int] = None,
                    clip_grad: Optional[float] = None) -> EngineSettings:
    """The engine settings for ``world_size`` ranks. With the recipe's ``global_batch``, the
    accumulation is derived from it; with the recipe's ``clip_grad`` (train.clip_grad), the clipping
    is that (``recipe_clip``); ``raw`` of the result is what DeepSpeed gets (with the resolved
    train_batch_size, micro batch, accumulation and gradient_clipping written in)."""
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
    if global_batch is not None:
        micro, accum = _recipe_batch(raw, name, world_size, global_batch, micro, accum, total)
        total = global_batch
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
    clip = recipe_clip(float(clip), clip_grad, name)
    resolved = {**raw, "train_batch_size": total, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
    if clip_grad is not None:
        resolved["gradient_clipping"] = clip
    return EngineSettings(micro, accum, total, zero, bf16, fp16, clip, resolved)


def recipe_clip(json_clip: float, clip_grad: Optional[float], name: str = "ds_config") -> float:
    """The clipping DeepSpeed applies: the recipe's ``train.clip_grad`` when set (the JSON may say
    0, i.e. nothing, or the same value), else the JSON's ``gradient_clipping``."""
    if clip_grad is None:
        return json_clip
    if clip_grad < 0:
        raise ConfigError(f"config key 'train.clip_grad' = {clip_grad} must be >= 0 (0: no clipping; null: the ds_config's)")
    if json_clip not in (0.0, float(clip_grad)):
        raise ConfigError(f"{name} sets gradient_clipping {json_clip:g} but the recipe's train.clip_grad is {clip_grad:g}: the "
                          "recipe owns clipping; set gradient_clipping to 0 (or remove it) in the JSON, or --set "
                          f"train.clip_grad={json_clip:g} to choose the JSON's value")
    return float(clip_grad)

"""The DeepSpeed JSON: shipped files, batch-size arithmetic, and what is rejected (and why)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mimscale.ds_config import EngineSettings, check_ds_config, load_ds_config
from mimscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def _write(tmp_path: Path, obj, name: str = "ds.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_shipped_configs_exist():
    names = {p.stem for p in DS_CONFIGS}
    for prefix in ("cpu_fp32", "gpu_bf16"):
        for stage in (1, 2, 3):
            assert f"{prefix}_zero{stage}" in names


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_checks(path, world):
    eng = load_ds_config(path, world)
    assert isinstance(eng, EngineSettings)
    raw = json.loads(path.read_text())
    # what DeepSpeed gets: the file with the resolved batch settings written in
    assert eng.raw == {**raw, "train_batch_size": eng.global_batch, "train_micro_batch_size_per_gpu": eng.micro_batch,
                       "gradient_accumulation_steps": eng.grad_accum}
    assert "gradient_accumulation_steps" not in raw and "train_batch_size" not in raw  # the recipe owns the global batch
    assert "optimizer" not in raw and "scheduler" not in raw
    stage = re.search(r"zero(\d)", path.stem)
    assert stage, path.name
    assert eng.zero_stage == int(stage.group(1)) == raw["zero_optimization"]["stage"]
    assert eng.global_batch == eng.micro_batch * eng.grad_accum * world
    assert eng.fp16 is False
    if path.stem.startswith("gpu"):
        assert eng.bf16 is True and eng.precision == "bf16"
        assert (eng.micro_batch, eng.grad_accum) == (128, 1)  # without a recipe's global batch: micro x world
        assert eng.global_batch == 128 * world
        recipe = load_ds_config(path, world, global_batch=4096)
        assert (recipe.micro_batch, recipe.grad_accum, recipe.global_batch) == (128, 32 // world, 4096)
    else:
        assert path.stem.startswith("cpu")
        assert "bf16" not in raw and "fp16" not in raw
        assert eng.bf16 is False and eng.precision == "fp32"
    assert eng.clip == float(raw.get("gradient_clipping", 0.0))


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_rejected_with_reason(tmp_path, key):
    raw = json.loads((REPO / "ds_configs" / "cpu_fp32_zero1.json").read_text())
    raw[key] = {"type": "AdamW", "params": {"lr": 1e-3}}
    p = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_ds_config(p, 1)
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert "YAML" in msg and "Python" in msg
    assert str(p) in msg  # names the file
    assert "Remove it" in msg


@pytest.mark.parametrize(
    "raw,world,numbers",
    [
        ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 2, ["100", "8", "2", "32"]),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 1, ["64", "8", "4", "32"]),
        ({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 128, "gradient_accumulation_steps": 4}, 1, ["1024", "128", "4", "512"]),
    ],
)
def test_batch_sizes_that_do_not_add_up(raw, world, numbers):
    with pytest.raises(ConfigError) as e:
        check_ds_config(raw, world)
    msg = str(e.value)
    assert "do not add up" in msg
    for n in numbers:
        assert re.search(rf"\b{n}\b", msg), (n, msg)
    assert f"world size {world}" in msg


def test_batch_sizes_that_add_up():
    eng = check_ds_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 2)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (8, 4, 64)


def test_micro_derived_from_train_batch_size():
    eng = check_ds_config({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 2)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (16, 2, 64)
    eng = check_ds_config({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (8, 2, 64)
    with pytest.raises(ConfigError, match=r"train_batch_size 64 is not divisible by gradient_accumulation_steps 3 x world size 2"):
        check_ds_config({"train_batch_size": 64, "gradient_accumulation_steps": 3}, 2)


def test_accum_derived_from_train_batch_size():
    eng = check_ds_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (8, 4, 64)
    with pytest.raises(ConfigError, match=r"train_batch_size 64 is not divisible by micro batch 12 x world size 2"):
        check_ds_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 12}, 2)


def test_only_micro_given():
    eng = check_ds_config({"train_micro_batch_size_per_gpu": 8}, 3)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (8, 1, 24)
    eng = check_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 5}, 2)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (8, 5, 80)
    assert (eng.zero_stage, eng.bf16, eng.fp16, eng.clip, eng.precision) == (0, False, False, 0.0, "fp32")


def test_no_batch_size_rejected():
    for raw in ({}, {"gradient_accumulation_steps": 2}, {"zero_optimization": {"stage": 1}}):
        with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
            check_ds_config(raw, 1)


@pytest.mark.parametrize("key", ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"])
@pytest.mark.parametrize("value", [0, -8, 8.0, 8.5, "8", "eight", True, [8]])
def test_non_positive_or_non_integer_batch_values(key, value):
    raw = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16}
    raw[key] = value
    with pytest.raises(ConfigError) as e:
        check_ds_config(raw, 2, name="my.json")
    msg = str(e.value)
    assert f"'{key}'" in msg and "positive integer" in msg and msg.startswith("my.json")


def test_precision_and_stage_options():
    base = {"train_micro_batch_size_per_gpu": 2}
    with pytest.raises(ConfigError, match="fp16 is not supported.*use bf16"):
        check_ds_config({**base, "fp16": {"enabled": True}}, 1)
    assert check_ds_config({**base, "bf16": {"enabled": False}}, 1).precision == "fp32"
    assert check_ds_config({**base, "gradient_clipping": 1.0}, 1).clip == 1.0
    with pytest.raises(ConfigError, match="at most one of bf16 and fp16"):
        check_ds_config({**base, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, 1)
    for stage in (0, 1, 2, 3):
        assert check_ds_config({**base, "zero_optimization": {"stage": stage}}, 1).zero_stage == stage
    for stage in (4, -1):
        with pytest.raises(ConfigError, match=r"zero_optimization\.stage"):
            check_ds_config({**base, "zero_optimization": {"stage": stage}}, 1)


@pytest.mark.parametrize(
    "raw,key",
    [
        ([{"train_micro_batch_size_per_gpu": 8}], None),  # valid JSON, but not an object
        ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": "two"}}, "zero_optimization.stage"),
        ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1.5}}, "zero_optimization.stage"),
        ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": 2}, "zero_optimization"),
        ({"train_micro_batch_size_per_gpu": 8, "bf16": True}, "bf16"),
        ({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": "x"}, "gradient_clipping"),
    ],
)
def test_malformed_sections_give_config_error(tmp_path, raw, key):
    """load_ds_config promises a ConfigError with the reason, not an AttributeError/ValueError
    from deep inside the check, and no silent truncation of a fractional ZeRO stage."""
    p = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_ds_config(p, 1)
    if key is not None:
        assert key in str(e.value), str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found") as e:
        load_ds_config(tmp_path / "nope.json", 1)
    assert "nope.json" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config(tmp_path, 1)  # a folder is not a file


@pytest.mark.parametrize("text", ["{", "", "{'single': 'quotes'}", '{"a": 1,}', "not json"])
def test_invalid_json(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        load_ds_config(p, 1)
    assert str(p) in str(e.value)


def test_load_matches_check(tmp_path):
    raw = {"train_batch_size": 48, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    a = load_ds_config(_write(tmp_path, raw), 3)
    b = check_ds_config(raw, 3)
    assert a == b
    assert (a.micro_batch, a.grad_accum, a.global_batch, a.zero_stage, a.precision) == (8, 2, 48, 2, "bf16")


@pytest.mark.parametrize("world,accum", [(1, 32), (8, 4), (16, 2), (32, 1)])
def test_the_recipe_global_batch_fixes_the_accumulation(world, accum):
    eng = check_ds_config({"train_micro_batch_size_per_gpu": 128}, world, global_batch=4096)
    assert (eng.micro_batch, eng.grad_accum, eng.global_batch) == (128, accum, 4096)
    assert eng.raw["gradient_accumulation_steps"] == accum and eng.raw["train_batch_size"] == 4096
    # a JSON that also states them must agree
    same = check_ds_config({"train_micro_batch_size_per_gpu": 128, "gradient_accumulation_steps": accum, "train_batch_size": 4096},
                           world, global_batch=4096)
    assert same.grad_accum == accum


def test_a_world_size_that_does_not_divide_the_global_batch_names_what_would():
    with pytest.raises(ConfigError) as e:
        check_ds_config({"train_micro_batch_size_per_gpu": 128}, 48, global_batch=4096)
    msg = str(e.value)
    assert "train.global_batch 4096 is not divisible by micro batch 128 x world size 48" in msg
    assert "32 (accumulation 1)" in msg and "16 (accumulation 2)" in msg  # world sizes for micro 128
    assert "no micro batch works on 48 ranks" in msg and "64" in msg
    with pytest.raises(ConfigError) as e:
        check_ds_config({"train_micro_batch_size_per_gpu": 48}, 8, global_batch=4096)
    assert "micro batches that work on 8 ranks (--set train.micro_batch=M): 16 (accumulation 32), 32 (accumulation 16), 64 (accumulation 8)" in str(e.value)


def test_a_json_batch_that_disagrees_with_the_recipe_names_both(tmp_path):
    with pytest.raises(ConfigError, match=r"my.json sets train_batch_size 2048 but the recipe's train.global_batch is 4096"):
        check_ds_config({"train_micro_batch_size_per_gpu": 128, "train_batch_size": 2048}, 8, name="my.json", global_batch=4096)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps 2, but train.global_batch 4096 over micro batch 128 x 8 ranks needs 4"):
        check_ds_config({"train_micro_batch_size_per_gpu": 128, "gradient_accumulation_steps": 2}, 8, global_batch=4096)
    with pytest.raises(ConfigError, match=r"set 'train_micro_batch_size_per_gpu'"):
        check_ds_config({"train_batch_size": 4096}, 8, global_batch=4096)


def test_fp32_gradient_reduction_passes_through_to_deepspeed(tmp_path):
    """docs/cluster.md's fp32-reduction block: ``communication_data_type`` reaches the engine unchanged."""
    raw = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "communication_data_type": "fp32",
           "zero_optimization": {"stage": 1}}
    eng = load_ds_config(_write(tmp_path, raw), 2, global_batch=64)
    assert eng.raw["communication_data_type"] == "fp32" and eng.precision == "bf16" and eng.grad_accum == 4


def test_the_recipe_owns_gradient_clipping(tmp_path):
    """train.clip_grad (the YAML) is what DeepSpeed gets as gradient_clipping; null leaves the JSON's."""
    base = {"train_micro_batch_size_per_gpu": 4}
    assert check_ds_config(dict(base), 1).clip == 0.0 and "gradient_clipping" not in check_ds_config(dict(base), 1).raw
    assert check_ds_config({**base, "gradient_clipping": 1.0}, 1).clip == 1.0  # null: the JSON's value
    for json_clip in (None, 0.0, 5.0):  # absent, "none", or the same value: the recipe's 5 applies
        raw = dict(base) if json_clip is None else {**base, "gradient_clipping": json_clip}
        eng = check_ds_config(raw, 2, clip_grad=5.0)
        assert eng.clip == 5.0 and eng.raw["gradient_clipping"] == 5.0
    off = check_ds_config(dict(base), 1, clip_grad=0.0)
    assert off.clip == 0.0 and off.raw["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match=r"gradient_clipping 1 but the recipe's train.clip_grad is 5.*--set train.clip_grad=1"):
        load_ds_config(_write(tmp_path, {**base, "gradient_clipping": 1.0}), 1, clip_grad=5.0)
    with pytest.raises(ConfigError, match=r"train.clip_grad.*>= 0"):
        check_ds_config(dict(base), 1, clip_grad=-1.0)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_json_takes_simmims_clipping(path):
    assert load_ds_config(path, 1, clip_grad=5.0).raw["gradient_clipping"] == 5.0

"""Run configuration: presets, overrides, and the error messages for bad keys and values."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mimscale.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    flatten,
    get_key,
    load_config,
    parse_override,
    to_dict,
)
from mimscale.ds_config import load_ds_config

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "mimscale" / "configs").glob("*.yaml"))


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"mae_vit_base.yaml", "mae_vit_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.preset == preset.stem
    # every key written in the YAML ends up in the config with that value
    data = yaml.safe_load(preset.read_text())
    for key, value in flatten(data).items():
        got = get_key(cfg, key)
        assert got == value or (isinstance(got, float) and got == float(value)) or (isinstance(got, str) and got == str(value)), key


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_first_line_is_its_launch_command(preset):
    first = preset.read_text().splitlines()[0]
    assert first.startswith("#"), first
    argv = shlex.split(first.lstrip("#"))
    assert "mimscale/pretrain.py" in argv
    assert (REPO / "mimscale" / "pretrain.py").is_file()
    ds = argv[argv.index("--deepspeed_config") + 1]
    assert re.fullmatch(r"ds_configs/[\w.-]+\.json", ds), ds
    assert (REPO / ds).is_file(), ds
    assert argv[argv.index("--config") + 1] == f"mimscale/configs/{preset.name}"
    # the command as written is valid: overrides apply, and the JSON fits the launch's world size
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(preset, overrides)
    assert cfg.train.global_batch, "every shipped preset states its recipe's global batch"
    if "--num_gpus" in argv:
        world = int(argv[argv.index("--num_gpus") + 1])
        eng = load_ds_config(REPO / ds, world, cfg.train.global_batch)
        assert eng.global_batch == eng.micro_batch * eng.grad_accum * world == cfg.train.global_batch


def test_base_preset_is_the_paper_recipe():
    cfg = load_config(REPO / "mimscale" / "configs" / "mae_vit_base.yaml")
    assert (cfg.model.name, cfg.model.img_size, cfg.masking.mask_ratio) == ("vit_base", 224, 0.75)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.base_lr) == (800, 40, 1.5e-4)
    # the paper's 4096 on any GPU count: 8 x micro 128 (the JSON on its first line) x accumulation 4, or 64 x 128 x 1
    assert cfg.train.global_batch == 4096
    for world, micro, accum in ((8, None, 4), (32, None, 1), (64, 64, 1)):
        eng = load_ds_config(REPO / "ds_configs" / "gpu_bf16_zero1.json", world, cfg.train.global_batch, micro)
        assert (eng.global_batch, eng.grad_accum) == (4096, accum)
    with pytest.raises(ConfigError, match="micro batches that work on 64 ranks"):  # micro 128 x 64 GPUs would be 8192
        load_ds_config(REPO / "ds_configs" / "gpu_bf16_zero1.json", 64, cfg.train.global_batch)


def test_relaxmim_presets_are_the_papers_recipes():
    """RelaxMIM (Kong & Zhang 2023) section 5 and appendix: R-MAE base lr 3e-4, C-MAE 1.5e-4 with
    momentum 0.996, temperature 0.2 and 2048/768-d heads; both 1024 images, 20 warm-up of 100 epochs."""
    r = load_config(REPO / "mimscale" / "configs" / "rmae_vit_base.yaml")
    c = load_config(REPO / "mimscale" / "configs" / "cmae_vit_base.yaml")
    for cfg, lr in ((r, 3e-4), (c, 1.5e-4)):
        assert (cfg.model.name, cfg.masking.mask_ratio, cfg.train.global_batch) == ("vit_base", 0.75, 1024)
        assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.base_lr) == (100, 20, lr)
    assert (r.masking.method, r.masking.rmae.lam) == ("rmae", 1.0)
    k = c.masking.cmae
    assert (c.masking.method, k.temperature, k.momentum, k.proj_hidden, k.proj_dim) == ("cmae", 0.2, 0.996, 2048, 768)


def test_defaults_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.preset == ""


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)
    p = tmp_path / "empty.yaml"
    p.write_text("# only a comment\n")
    assert load_config(p) == dataclasses.replace(Config(), preset="empty")


# ----------------------------------------------------------------------------------------------
# unknown keys


@pytest.mark.parametrize(
    "override,key,cls",
    [
        ("train.stepz=3", "train.stepz", TrainConfig),
        ("data.sauce=folder", "data.sauce", DataConfig),
        ("model.depth=3", "model.depth", ModelConfig),
        ("outputdir=x", "outputdir", Config),
    ],
)
def test_unknown_key_names_key_and_allowed(override, key, cls):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert f"'{key}'" in msg
    for name in _field_names(cls):
        assert name in msg, (name, msg)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'train\.lr'.*base_lr"):
        load_config(p)


def test_unknown_deep_key():
    with pytest.raises(ConfigError):
        load_config(overrides=["train.steps.x=1"])  # steps is a scalar
    with pytest.raises(ConfigError, match=r"'train'.*expected a mapping"):
        load_config(overrides=["train=3"])


# ----------------------------------------------------------------------------------------------
# choices


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("masking.method=foo", "masking.method", ["random"]),
        ("data.source=bar", "data.source", ["synthetic", "folder"]),
        ("model.name=vit_xxl", "model.name", ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"]),
    ],
)
def test_bad_choice_names_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert f"'{key}'" in msg
    bad = override.split("=", 1)[1]
    assert bad in msg
    for v in allowed:
        assert v in msg, (v, msg)


# ----------------------------------------------------------------------------------------------
# types


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=true", "train.steps"),
        ("train.log_every=[1, 2]", "train.log_every"),
        ("tracking.enabled=maybe", "tracking.enabled"),
        ("tracking.enabled=2", "tracking.enabled"),
        ("masking.mask_ratio=lots", "masking.mask_ratio"),
        ("masking.mask_ratio=false", "masking.mask_ratio"),
        ("output_dir={a: 1}", "output_dir"),
        ("train.steps=.inf", "train.steps"),
        ("train.steps=.nan", "train.steps"),
        # every float key refuses NaN and inf: a NaN passes every range check, inf never ends
        ("train.epochs=inf", "train.epochs"),
        ("train.epochs=.inf", "train.epochs"),
        ("train.base_lr=nan", "train.base_lr"),
        ("masking.mask_ratio=.nan", "masking.mask_ratio"),
        ("masking.amt.throw_ratio=-inf", "masking.amt.throw_ratio"),
        ("data.hflip=NaN", "data.hflip"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert f"'{key}'" in str(e.value)


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        overrides=[
            "train.steps=40",
            "train.base_lr=0.5",
            "train.weight_decay=1e-3",  # PyYAML reads 1e-3 as a string; still a number here
            "train.epochs=3",  # int for a float key
            "tracking.enabled=false",
            "model.norm_pix_loss=no",
            "train.warmup_steps=null",
            "tracking.run_name=~",
            "model.patch_size=8",
            "model.img_size=64",
            "output_dir=runs/x=y",  # only the first '=' splits
            "data.path=",
            "train.steps=50",  # later overrides win
        ]
    )
    assert cfg.train.steps == 50 and type(cfg.train.steps) is int
    assert cfg.train.base_lr == 0.5
    assert cfg.train.weight_decay == pytest.approx(1e-3) and type(cfg.train.weight_decay) is float
    assert cfg.train.epochs == 3.0 and type(cfg.train.epochs) is float
    assert cfg.tracking.enabled is False
    assert cfg.model.norm_pix_loss is False
    assert cfg.train.warmup_steps is None
    assert cfg.tracking.run_name is None
    assert (cfg.model.patch_size, cfg.model.img_size) == (8, 64)
    assert cfg.output_dir == "runs/x=y"
    assert cfg.data.path == ""
    on = load_config(overrides=["tracking.enabled=true", "train.steps=2.0", "tracking.run_name=123"])
    assert on.tracking.enabled is True
    assert on.train.steps == 2 and type(on.train.steps) is int
    assert on.tracking.run_name == "123"


def test_parse_override():
    assert parse_override("train.steps=40") == (["train", "steps"], 40)
    assert parse_override(" a.b = 1.5") == (["a", "b"], 1.5)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=a=b") == (["x"], "a=b")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.steps")


def test_overrides_apply_on_top_of_preset():
    preset = REPO / "mimscale" / "configs" / "mae_vit_tiny_cpu.yaml"
    cfg = load_config(preset, ["train.steps=7", "data.source=synthetic"])
    assert cfg.train.steps == 7 and cfg.data.source == "synthetic"
    assert cfg.model.img_size == 64  # from the YAML, untouched
    assert cfg.preset == "mae_vit_tiny_cpu"


# ----------------------------------------------------------------------------------------------
# ranges


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["masking.mask_ratio=0"], "masking.mask_ratio"),
        (["masking.mask_ratio=1"], "masking.mask_ratio"),
        (["masking.mask_ratio=1.5"], "masking.mask_ratio"),
        (["train.log_every=0"], "train.log_every"),
        (["train.ckpt_every=-1"], "train.ckpt_every"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        (["train.steps=0"], "train.steps"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.hflip=1.5"], "data.hflip"),
        (["data.scale_min=0"], "data.scale_min"),
        (["data.scale_min=0.9", "data.scale_max=0.5"], "data.scale_max"),
        (["data.scale_max=1.2"], "data.scale_max"),
        (["model.img_size=225"], "model.img_size"),  # vit_base patch 16
        (["model.name=vit_huge", "model.img_size=224"], "model.img_size"),  # patch 14: 224 % 14 == 0 ...
        (["model.patch_size=12", "model.img_size=64"], "model.img_size"),
        (["model.decoder_dim=500", "model.decoder_heads=16"], "model.decoder_dim"),
        (["data.source=folder", "data.path="], "data.path"),
        (["train.epochs=0"], "train.epochs"),
    ],
)
def test_range_errors_name_key(overrides, key):
    if overrides == ["model.name=vit_huge", "model.img_size=224"]:
        load_config(overrides=overrides)  # ... so this one is fine
        overrides = ["model.name=vit_huge", "model.img_size=225"]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert f"'{key}'" in str(e.value), str(e.value)


def test_patch_size_override_makes_img_size_valid():
    with pytest.raises(ConfigError):
        load_config(overrides=["model.img_size=72"])  # 72 % 16
    cfg = load_config(overrides=["model.img_size=72", "model.patch_size=8"])
    assert cfg.model.img_size == 72


def test_epochs_may_be_zero_when_steps_set():
    assert load_config(overrides=["train.epochs=0", "train.steps=10"]).train.steps == 10


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.decoder_heads=0", "model.decoder_heads"),  # must not be a ZeroDivisionError
        ("model.img_size=0", "model.img_size"),
        ("model.img_size=-224", "model.img_size"),
        ("model.patch_size=0", "model.patch_size"),
        ("model.patch_size=-16", "model.patch_size"),
        ("model.decoder_dim=0", "model.decoder_dim"),
        ("data.max_bad_in_a_row=-1", "data.max_bad_in_a_row"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
    ],
)
def test_nonsense_sizes_rejected_before_any_model_is_built(override, key):
    """config.py promises every key is validated before a model is built; these values would
    otherwise surface later as a crash (ZeroDivisionError, empty tensors, a loader that fails
    every sample with '0 unreadable files in a row')."""
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert f"'{key}'" in str(e.value), str(e.value)


def test_resume_values(tmp_path):
    assert load_config(overrides=["resume=auto"]).resume == "auto"
    assert load_config(overrides=["resume=never"]).resume == "never"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert load_config(overrides=[f"resume={ckpt}"]).resume == str(ckpt)
    for bad in (str(tmp_path / "missing"), "always", "Auto"):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=[f"resume={bad}"])
        msg = str(e.value)
        assert "'resume'" in msg and "auto" in msg and "never" in msg and bad in msg


# ----------------------------------------------------------------------------------------------
# to_dict / flatten


def test_flatten_to_dict():
    cfg = load_config(REPO / "mimscale" / "configs" / "mae_vit_base.yaml", ["train.steps=5"])
    d = to_dict(cfg)
    assert d["train"]["steps"] == 5 and d["model"]["name"] == "vit_base"
    flat = flatten(d)
    assert all(not isinstance(v, dict) for v in flat.values())
    # exactly one entry per leaf field, each equal to the config's value
    def leaf_keys(obj, prefix=""):  # nested dataclasses at any depth (masking.amt.*)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            yield from leaf_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]

    leaves = list(leaf_keys(cfg))
    assert sorted(flat) == sorted(leaves)
    for k, v in flat.items():
        assert get_key(cfg, k) == v, k
    assert flat["train.steps"] == 5 and flat["output_dir"] == "runs/mae_vit_base"


def test_flatten_prefix_and_nesting():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}, "ds.") == {"ds.a.b.c": 1, "ds.a.d": [1, 2], "ds.e": None}
    assert flatten({}) == {}


def test_flattened_config_round_trips_through_overrides():
    cfg = load_config(REPO / "mimscale" / "configs" / "mae_vit_tiny_cpu.yaml")
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k != "preset"}
    again = load_config(overrides=[f"{k}={'null' if v is None else v}" for k, v in flat.items()])
    assert dataclasses.replace(again, preset=cfg.preset) == cfg


def test_cka_health_check_keys_are_checked_by_name():
    from mimscale.config import load_config
    from mimscale.errors import ConfigError

    for key, bad in (("tracking.cka_every_epochs", "-1"), ("tracking.cka_images", "1")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={bad}"])
    assert load_config(None, ["tracking.cka_every_epochs=0"]).tracking.cka_every_epochs == 0  # 0: never


def test_changes_on_resume_name_what_changes_training_and_skip_cadence():
    from mimscale.config import changes_on_resume, flatten, to_dict

    saved = to_dict(load_config(None, ["train.base_lr=0.1", "model.decoder_depth=2"]))
    saved["masking"].pop("blockwise")  # a section a later version added is not a change
    now = load_config(None, ["train.base_lr=0.2", "model.decoder_depth=2", "train.steps=500", "train.log_every=7",
                             "data.num_workers=3", "tracking.enabled=false", "masking.blockwise.min_block=9"])
    assert changes_on_resume(saved, now) == {"train.base_lr": (0.1, 0.2)}
    assert changes_on_resume(flatten({}), now) == {}


@pytest.mark.parametrize("text, line, column, says", [
    ("model:\n  name: vit_base\n   img_size: 224\n", 3, 12, "mapping values are not allowed here"),
    ("model:\n\tname: vit_base\n", 2, 1, "YAML indents with spaces, not tabs"),
    ("model: {name: [vit_base\n", 2, 1, "(the end of the file): expected ',' or ']'"),
], ids=["indentation", "tab", "unclosed-bracket"])
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, line, column, says):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"config file {p}, line {line}, column {column}"), msg
    assert says in msg and "^" in msg


def test_unclosed_bracket_also_names_where_it_opened(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 3\nmodel: {name: [vit_base\n")
    with pytest.raises(ConfigError, match=r"while parsing a flow sequence that starts at line 3, column 15"):
        load_config(p)


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(p))}: not UTF-8 text"):
        load_config(p)


def test_clip_grad_key():
    assert load_config(None).train.clip_grad is None  # the ds_config's (every shipped JSON: none)
    assert load_config(None, ["train.clip_grad=5"]).train.clip_grad == 5.0
    with pytest.raises(ConfigError, match=r"train\.clip_grad.*>= 0"):
        load_config(None, ["train.clip_grad=-1"])


def test_a_set_value_that_is_not_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"--set 'train.steps=\[3': the value of 'train.steps' is not a YAML value"):
        load_config(None, ["train.steps=[3"])


def test_a_key_the_checkpoint_lacks_is_compared_with_its_default():
    """A checkpoint written before model.pos_embed existed trained with its default (sincos): a resume
    with a preset that sets learned positions is a change; one that keeps the default is not."""
    from mimscale.config import changes_on_resume, to_dict

    saved = to_dict(load_config(None))
    del saved["model"]["pos_embed"]
    assert changes_on_resume(saved, load_config(None)) == {}
    assert changes_on_resume(saved, load_config(None, ["model.pos_embed=learned"])) == {"model.pos_embed": ("sincos", "learned")}

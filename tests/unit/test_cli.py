"""The installed product's surface without a launch: shipped presets and ds_configs by name, the
`mimscale` command (version, presets, config list, tools by name), format versions of checkpoints
and exports, and pretrain's --set/--print-config/--dry-run/--help (each as a real subprocess where
its output or exit status is the feature)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mimscale
from mimscale import cli, config_keys, shipped
from mimscale.checkpoint import formats
from mimscale.config import load_config
from mimscale.ds_config import load_ds_config
from mimscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """A subprocess with this checkout's mimscale first on sys.path (the venv's editable install may
    point at another checkout), from ``cwd``."""
    from tests.integration.launch import env

    e = {**env(), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ shipped presets and ds_configs


def test_every_preset_and_ds_config_ships_inside_the_package_and_the_root_folder_links_to_it():
    assert "mae_vit_base" in shipped.names("preset") and "mae_vit_tiny_cpu" in shipped.names("preset")
    assert shipped.names("ds_config") == [f"{d}_zero{z}" for d in ("cpu_fp32", "gpu_bf16") for z in range(4)]
    assert (REPO / "ds_configs").resolve() == (REPO / "mimscale" / "ds_configs").resolve()
    setup = (REPO / "setup.py").read_text()
    assert '"configs/*.yaml", "ds_configs/*.json"' in setup  # package_data: the wheel carries them


def test_a_name_a_file_name_and_a_path_resolve_and_a_path_wins(tmp_path, monkeypatch):
    by_name = shipped.resolve_ds_config("gpu_bf16_zero1")
    assert by_name == REPO / "mimscale" / "ds_configs" / "gpu_bf16_zero1.json"
    assert shipped.resolve_ds_config("gpu_bf16_zero1.json") == by_name
    assert shipped.resolve_ds_config("ds_configs/gpu_bf16_zero1.json") == Path("ds_configs/gpu_bf16_zero1.json")  # as given
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "mae_vit_base.yaml"
    own.write_text("train:\n  steps: 7\n")
    assert shipped.resolve_preset("mae_vit_base.yaml") == Path("mae_vit_base.yaml")  # the user's file, not the shipped one
    assert load_config("mae_vit_base.yaml").train.steps == 7
    assert load_config("mae_vit_base").train.steps is None and load_config("mae_vit_base").preset == "mae_vit_base"
    assert load_ds_config("cpu_fp32_zero1", world_size=2).micro_batch == 8


@pytest.mark.parametrize("kind,value,option", [("preset", "mae_vit_bsae", "config file"),
                                               ("ds_config", "gpu_bf16_zero9", "--deepspeed_config file"),
                                               ("preset", "configs/mae_vit_base.yaml", "config file")])
def test_an_unknown_name_lists_the_shipped_names(kind, value, option):
    with pytest.raises(ConfigError) as e:
        shipped.resolve(kind, value)
    msg = str(e.value)
    assert msg.startswith(f"{option} not found: {value}") and all(n in msg for n in shipped.names(kind))


# --------------------------------------------------------------------------------- mimscale CLI


def test_version_is_one_number_everywhere(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"mimscale {mimscale.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", mimscale.__version__)
    assert f"## {mimscale.__version__} - " in (REPO / "CHANGELOG.md").read_text()
    from tests.unit.test_setup import _setup_kwargs

    kw = _setup_kwargs()
    assert kw["version"] == mimscale.__version__
    assert kw["entry_points"] == {"console_scripts": ["mimscale = mimscale.cli:run"]}


def test_presets_lists_every_shipped_file_with_what_it_is(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in shipped.names("preset") + shipped.names("ds_config"):
        assert re.search(rf"^  {name}\s", out, re.M), name
    assert re.search(r"^  mae_vit_huge\s+random\s+vit_huge\s+224 px\s+with gpu_bf16_zero2$", out, re.M)
    assert re.search(r"^  gpu_bf16_zero3\s+ZeRO-3, bf16, micro batch 128$", out, re.M)
    assert cli.main(["presets", "extra"]) == 2


def test_config_list_gives_type_default_allowed_values_and_the_source_comment(capsys):
    assert cli.main(["config", "list", "train"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\.base_lr\s+float\s+default 0\.00015$", out, re.M)
    assert "lr = base_lr * global_batch / 256" in out
    assert re.search(r"^train\.steps\s+int or null\s+default null$", out, re.M)
    assert "data.source" not in out  # only the section asked for
    assert cli.main(["config", "list", "--json"]) == 0
    keys = {k["key"]: k for k in json.loads(capsys.readouterr().out)}
    assert keys["data.source"]["allowed"] == ["synthetic", "folder", "wds", "ffcv"] and keys["data.source"]["type"] == "choice"
    assert keys["masking.amt.normalize"]["default"] == "mean_then_minmax"
    # every key the listing names is one the loader takes, with the listed default
    cfg = load_config(None, [])
    for k in keys.values():
        obj = cfg
        for part in k["key"].split("."):
            obj = getattr(obj, part)
        assert obj == k["default"], k["key"]
    with pytest.raises(SystemExit) as e:
        cli.main(["config", "list", "trian"])
    assert e.value.code == 2 and "no section 'trian'; sections: model, masking" in capsys.readouterr().err


def test_field_comments_take_the_comment_above_and_beside_a_field():
    import dataclasses

    @dataclasses.dataclass
    class Probe:
        # two lines
        # above
        a: int = 1  # and beside
        b: str = "x"

        # separated by a blank line from c
        c: float = 0.5  # c's own
    assert config_keys.field_comments(Probe) == {"a": "two lines above and beside", "b": "", "c": "separated by a blank line from c c's own"}


def test_tools_run_by_name_and_unknown_commands_are_named(capsys):
    assert set(cli.TOOLS) == {"prep-wds", "prep-ffcv", "verify", "eval", "export", "report", "plan", "bench"}
    with pytest.raises(SystemExit) as e:  # the tool's own parser: `mimscale export --help` is export's help
        cli.main(["export", "--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    assert cli.main(["exprot"]) == 2 and "unknown command 'exprot'; commands: presets, config, prep-wds" in capsys.readouterr().err
    assert cli.main([]) == 2 and "usage: mimscale" in capsys.readouterr().err


def test_python_dash_m_mimscale_is_the_console_script_and_version_imports_no_torch(tmp_path):
    r = _run("-X", "importtime", "-m", "mimscale", "--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == f"mimscale {mimscale.__version__}\n", r.stderr[-2000:]
    assert not re.search(r"\|\s+(torch|deepspeed)$", r.stderr, re.M)  # --version stays instant


# ---------------------------------------------------------------------------- format versions


def test_a_newer_format_is_refused_naming_both_versions_and_older_ones_are_read():
    meta = formats.stamp("export", {"x": 1})
    assert meta[formats.KEY] == formats.SUPPORTED["export"] and meta[formats.WRITER_KEY] == mimscale.__version__
    assert formats.check("export", meta, "e/mimscale.json") == 1
    assert formats.check("checkpoint", {"step": 3}, "tag/COMPLETE") == 0  # written before versioning
    newer = {formats.KEY: formats.SUPPORTED["checkpoint"] + 1, formats.WRITER_KEY: "9.0.0"}
    with pytest.raises(formats.FormatVersionError, match=r"tag/COMPLETE: checkpoint format version 2 \(written by mimscale 9\.0\.0\); "
                                                         r"this mimscale \(.*\) reads checkpoint format versions 0 to 1"):
        formats.check("checkpoint", newer, "tag/COMPLETE")
    with pytest.raises(formats.FormatVersionError, match="is not a format version"):
        formats.check("export", {formats.KEY: "1"}, "x")


def test_an_export_records_its_format_and_a_newer_one_is_refused_by_the_reader(tmp_path):
    from mimscale.checkpoint import weights
    from mimscale.export import write_export
    from tests.conftest import tiny_model

    model = tiny_model("mae")
    run_model = {"name": "vit_tiny", "img_size": 32, "patch_size": 8}
    out = tmp_path / "exp"
    cfg = write_export(out, run_model, model.encoder.state_dict())
    written = json.loads((out / "mimscale.json").read_text())
    assert cfg[formats.KEY] == written[formats.KEY] == formats.SUPPORTED["export"]
    weights.load_encoder(out)  # today's reader reads it
    written[formats.KEY] = formats.SUPPORTED["export"] + 1
    (out / "mimscale.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match=r"mimscale.json: export format version 2 .* read it with a newer mimscale"):
        weights.load_encoder(out)


# -------------------------------------------------------------------- pretrain's inspection flags


def test_several_pairs_per_set_and_repeated_sets_add_up():
    from mimscale.pretrain import parse_args

    args = parse_args(["--config", "mae_vit_tiny_cpu", "--set", "train.steps=3", "data.source=synthetic", "--set",
                       "train.min_lr=0", "--deepspeed_config", "cpu_fp32_zero1"])
    assert args.overrides == ["train.steps=3", "data.source=synthetic", "train.min_lr=0"]
    assert load_config(args.config, args.overrides).train.steps == 3


def test_print_config_is_loadable_yaml_with_the_derived_numbers(tmp_path):
    r = _run("-m", "mimscale.pretrain", "--config", "mae_vit_base", "--deepspeed_config", "gpu_bf16_zero1", "--world-size", "64",
             "--set", "train.micro_batch=32", "data.source=synthetic", "data.synthetic_count=1281167", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    again = load_config(printed)  # the YAML part is the resolved config; the derived part is comments
    assert again.train.micro_batch == 32 and again.data.synthetic_count == 1281167 and again.train.epochs == 800
    derived = r.stdout.split("# derived:", 1)[1]
    # MAE-B's recipe: global batch 4096 on 64 GPUs x micro 32 -> accumulation 2; lr 1.5e-4 x 16
    assert "world size 64: global batch 4096 = micro batch 32 x accumulation 2 x 64 ranks" in derived
    assert "lr 0.0024 (base_lr 0.00015 x 4096/256" in derived and "ZeRO stage 1, bf16" in derived
    # 1281167 // 4096 = 312 steps per epoch; 800 epochs = 249600 steps, 40 warmup epochs = 12480
    assert "249600 steps = 800 epochs of 312 steps (1281167 samples // 4096); warmup 12480 steps" in derived
    assert not (tmp_path / "runs").exists()


def test_dry_run_checks_everything_a_launch_checks_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    base = ["-m", "mimscale.pretrain", "--config", "mae_vit_tiny_cpu", "--deepspeed_config", "cpu_fp32_zero1", "--dry-run",
            "--set", f"output_dir={out}"]
    r = _run(*base, "data.source=synthetic", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 1: global batch 16 = micro batch 8 x accumulation 2 x 1 ranks" in r.stdout
    assert "50 steps = 0.3906 epochs of 128 steps (2048 samples // 16); warmup 5 steps" in r.stdout
    assert f"output_dir: a fresh start in {out} (created at launch)" in r.stdout
    assert re.search(r"memory per GPU \(mimscale plan's estimate, ZeRO-1, grad_ckpt 0, micro batch 8, fp32\): \d+\.\d\d GiB", r.stdout)
    assert not out.exists()
    # the checks a launch makes: a missing data folder, a batch that does not divide the world size
    r = _run(*base, f"data.path={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert r.returncode == 2 and "config key 'data.path'" in r.stderr and "is not a folder" in r.stderr
    r = _run(*base, "data.source=synthetic", "--world-size", "3", cwd=tmp_path)
    assert r.returncode == 2 and "train.global_batch 16 is not divisible by micro batch 8 x world size 3" in r.stderr
    assert not out.exists()


def test_help_lists_the_config_sections_and_points_at_config_list(tmp_path):
    r = _run("-m", "mimscale.pretrain", "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "mimscale config list" in r.stdout and "--print-config" in r.stdout and "--dry-run" in r.stdout
    for section, names in config_keys.sections().items():
        assert f"  {section or '(top level)'}: {', '.join(names)}" in r.stdout


def test_pretrain_hands_deepspeed_and_the_tracker_the_shipped_files_path():
    from mimscale.pretrain import parse_args, resolve_files

    args = parse_args(["--config", "mae_vit_base", "--deepspeed_config", "gpu_bf16_zero1"])
    config, ds = resolve_files(args)
    assert args.deepspeed_config == str(ds) == str(REPO / "mimscale" / "ds_configs" / "gpu_bf16_zero1.json")
    assert args.config == str(config) and config.name == "mae_vit_base.yaml"
    with pytest.raises(ConfigError, match="config file not found: mae_vit_bsae .*mae_vit_base"):
        resolve_files(parse_args(["--config", "mae_vit_bsae", "--deepspeed_config", "gpu_bf16_zero1"]))


def test_without_the_ffcv_extra_its_users_are_told_what_it_adds_and_how_to_install_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    from mimscale.config import check_paths

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"'data.source' = 'ffcv': FFCV is not installed: it is the optional \[ffcv\] extra.*"
                                          r"pip install 'mimscale\[ffcv\]'"):
        check_paths(load_config(None, ["data.source=ffcv", f"data.path={beton}"]))
    assert cli.main(["prep-ffcv", "--help"]) == 2
    assert "every other source works without it" in capsys.readouterr().err


def test_a_checkpoint_of_a_newer_format_is_refused_before_anything_is_built(tmp_path):
    from tests.integration.launch import TINY_SETS

    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": 2, "files": {}, formats.KEY: 99, formats.WRITER_KEY: "7.0.0"}))
    sets = [*TINY_SETS, f"output_dir={tmp_path / 'run'}"]
    r = _run("-m", "mimscale.pretrain", "--config", "mae_vit_tiny_cpu", "--deepspeed_config", "cpu_fp32_zero1", "--set", *sets,
             cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "checkpoint format version 99 (written by mimscale 7.0.0)" in r.stderr and "reads checkpoint format versions 0 to 1" in r.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]  # no lock, no log: nothing started


def test_the_checkpointer_stamps_its_marker(tmp_path):
    from mimscale.checkpoint import checkpointer

    tag = tmp_path / "step00000001"
    tag.mkdir()
    checkpointer._publish_marker(tag, {"step": 1, "files": {}})
    marker = json.loads((tag / checkpointer.MARKER).read_text())
    assert marker[formats.KEY] == formats.SUPPORTED["checkpoint"] and marker["step"] == 1
    assert checkpointer.verify(tag) is None

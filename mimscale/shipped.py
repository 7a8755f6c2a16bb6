"""The YAML presets and DeepSpeed JSONs that ship inside the package, addressable by name (and
what the one optional extra, FFCV, adds: said where it is first needed).

``--config mae_vit_base --deepspeed_config gpu_bf16_zero1`` names the files
``mimscale/configs/mae_vit_base.yaml`` and ``mimscale/ds_configs/gpu_bf16_zero1.json`` of the
installed package, so a ``pip install`` outside a checkout can launch without the repository. A
path to an existing file always wins (``ds_configs/cpu_fp32_zero1.json`` in a checkout: the root's
``ds_configs`` links to ``mimscale/ds_configs``); anything else that is neither a file nor a shipped
name is a ConfigError listing the shipped names.
"""
from __future__ import annotations

from pathlib import Path

from mimscale.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
# kind -> (folder inside the package, file suffix, the option that takes it)
KINDS = {
    "preset": (PACKAGE / "configs", ".yaml", "--config"),
    "ds_config": (PACKAGE / "ds_configs", ".json", "--deepspeed_config"),
}


def names(kind: str) -> list[str]:
    """The shipped files of ``kind`` ("preset" or "ds_config") by name (file stem), sorted."""
    folder, suffix, _ = KINDS[kind]
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def path_of(kind: str, name: str) -> Path:
    """The shipped file called ``name`` (a stem, or the file name with its suffix)."""
    folder, suffix, _ = KINDS[kind]
    return folder / (name if name.endswith(suffix) else name + suffix)


def resolve(kind: str, value: str | Path) -> Path:
    """An existing file as given, else the shipped file of that name, else a ConfigError naming the
    option, the value and every shipped name."""
    option = KINDS[kind][2]
    given = Path(value)
    if given.is_file():
        return given
    # a bare name (no folder part) may be a shipped file's stem or file name
    if given.name == str(value) and path_of(kind, str(value)).is_file():
        return path_of(kind, str(value))
    what = "config file" if kind == "preset" else f"{option} file"
    raise ConfigError(f"{what} not found: {value} (neither a file nor a shipped {kind} name; shipped {kind}s, by name: "
                      f"{', '.join(names(kind))})")


def resolve_preset(value: str | Path) -> Path:
    return resolve("preset", value)


def resolve_ds_config(value: str | Path) -> Path:
    return resolve("ds_config", value)


# The optional [ffcv] extra, said once where it is first needed (config.check_paths, mimscale prep-ffcv).
FFCV_EXTRA = ("FFCV is not installed: it is the optional [ffcv] extra, which adds data.source=ffcv (FFCV's .beton loader) and "
              "mimscale prep-ffcv; every other source works without it. Install it with: pip install 'mimscale[ffcv]' "
              "(it builds against the system OpenCV and libjpeg-turbo: apt-get install libopencv-dev libturbojpeg0-dev pkg-config; "
              "in a checkout: make setup FFCV=1)")

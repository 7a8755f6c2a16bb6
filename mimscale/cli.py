"""``mimscale <command>``: the console entry point of an installed mimscale.

    mimscale --version
    mimscale presets                      # the shipped presets and DeepSpeed configs, by name
    mimscale config list [SECTION] [--json]
    mimscale prep-wds|prep-ffcv|verify|eval|export|report|plan|bench ARGS...

Each tool command runs that tool's own ``main`` with the rest of the command line, exactly as
``python -m <module> ARGS...`` does (``mimscale eval probe --help`` is ``python -m mimscale.eval
probe --help``). Pretraining runs under the DeepSpeed launcher: ``deepspeed --module
mimscale.pretrain ...`` (or ``python -m mimscale.pretrain`` for one process).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional

import yaml

from mimscale import __version__, shipped

# command -> (module whose main(argv) runs it, what it does). A tool is imported only when its
# command runs (importlib, by name): `mimscale --version` or `mimscale presets` must not pay for
# importing torch and DeepSpeed (seconds), and a tool's optional dependency (FFCV) only matters to it.
TOOLS = {
    "prep-wds": ("data_prep.wds", "convert an ImageNet-layout folder into WebDataset shards"),
    "prep-ffcv": ("data_prep.ffcv", "convert an ImageNet-layout folder into an FFCV .beton (the [ffcv] extra)"),
    "verify": ("data_prep.verify", "check converted data (shards or .beton) against its manifest"),
    "eval": ("mimscale.eval.__main__", "linear probe, kNN or CKA of a checkpoint or export"),
    "export": ("mimscale.export", "a checkpoint's encoder (and decoder) for timm"),
    "report": ("mimscale.report", "pictures of a run from its output_dir"),
    "plan": ("mimscale.plan", "per-GPU memory per ZeRO stage; the micro batch that fits"),
    "bench": ("mimscale.bench.cli", "time one component: step, loader, decode, convert"),
}
OWN = {
    "presets": "list the presets (--config NAME) and DeepSpeed configs (--deepspeed_config NAME) shipped in the package",
    "config": "config list [SECTION] [--json]: every config key with its type, default and allowed values",
}


def usage() -> str:
    width = max(map(len, [*TOOLS, *OWN]))
    lines = [f"usage: mimscale [--version] <command> [ARGS...]   (mimscale {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in OWN.items()]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items()]
    lines += ["", "`mimscale <command> --help` for a command's options. Pretraining (under the DeepSpeed launcher):",
              "  deepspeed --num_gpus 8 --module mimscale.pretrain --deepspeed_config gpu_bf16_zero1 --config mae_vit_base \\",
              "      --set data.path=/datasets/imagenet output_dir=runs/mae_vit_base",
              "  python -m mimscale.pretrain ... --print-config | --dry-run   (what a launch would do, without launching)"]
    return "\n".join(lines)


def _header_ds_config(text: str) -> str:
    """The ds_config a preset's first comment line launches with (its name), or ""."""
    first = text.splitlines()[0] if text else ""
    words = first.split()
    if first.startswith("#") and "--deepspeed_config" in words[:-1]:
        return Path(words[words.index("--deepspeed_config") + 1]).stem
    return ""


def presets_table() -> str:
    """Every shipped preset (method, encoder, image size, the ds_config its header uses) and every
    shipped ds_config (ZeRO stage, precision, micro batch)."""
    lines = [f"presets (--config NAME), in {shipped.KINDS['preset'][0]}:"]
    rows = []
    for name in shipped.names("preset"):
        text = shipped.path_of("preset", name).read_text()
        raw = yaml.safe_load(text) or {}
        model, masking = raw.get("model") or {}, raw.get("masking") or {}
        rows.append((name, masking.get("method", "random"), model.get("name", "vit_base"), f"{model.get('img_size', 224)} px",
                     _header_ds_config(text)))
    width = max(len(r[0]) for r in rows)
    lines += [f"  {n:<{width}}  {m:<10} {e:<10} {px:<7} {'with ' + ds if ds else ''}".rstrip() for n, m, e, px, ds in rows]
    lines += ["", f"DeepSpeed configs (--deepspeed_config NAME), in {shipped.KINDS['ds_config'][0]}:"]
    for name in shipped.names("ds_config"):
        raw = json.loads(shipped.path_of("ds_config", name).read_text())
        precision = "bf16" if (raw.get("bf16") or {}).get("enabled") else "fp32"
        stage = (raw.get("zero_optimization") or {}).get("stage", 0)
        lines.append(f"  {name:<{width}}  ZeRO-{stage}, {precision}, micro batch {raw.get('train_micro_batch_size_per_gpu', '-')}")
    lines += ["", "A path to your own file works in either place; `mimscale config list` shows the keys a preset sets."]
    return "\n".join(lines)


def config_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mimscale config", description=OWN["config"])
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="every config key (or those of SECTION, e.g. train or masking.amt)")
    ls.add_argument("section", nargs="?", default=None, help="a section (model, masking, masking.amt, data, train, ...)")
    ls.add_argument("--json", action="store_true", help="one JSON list of {key, type, default, allowed, doc}")
    ls.add_argument("--brief", action="store_true", help="without the explanations")
    args = p.parse_args(argv)
    # torch and DeepSpeed come with the config tree: imported here, not for --version, and with
    # stdout pointing at stderr (DeepSpeed's logger keeps the stdout of its import), so --json is clean
    with contextlib.redirect_stdout(sys.stderr):
        config_keys = importlib.import_module("mimscale.config_keys")
    keys = config_keys.keys()
    if args.section is not None:
        prefix = args.section.rstrip(".") + "."
        keys = [k for k in keys if k.key.startswith(prefix)]
        if not keys:
            p.exit(2, f"mimscale config list: no section {args.section!r}; sections: "
                      f"{', '.join(s for s in config_keys.sections() if s)}\n")
    if args.json:
        print(json.dumps([{"key": k.key, "type": k.type, "default": k.default, "allowed": list(k.allowed), "doc": k.doc}
                          for k in keys], indent=1))
    else:
        print(config_keys.render(keys, docs=not args.brief))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mimscale {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "prep-ffcv" and importlib.util.find_spec("ffcv") is None:
        print(f"mimscale prep-ffcv: {shipped.FFCV_EXTRA}", file=sys.stderr)
        return 2
    if command in TOOLS:
        return importlib.import_module(TOOLS[command][0]).main(rest) or 0
    if command == "presets":
        if rest:
            print(f"mimscale presets takes no arguments, got {' '.join(rest)}", file=sys.stderr)
            return 2
        print(presets_table())
        return 0
    if command == "config":
        return config_command(rest)
    print(f"mimscale: unknown command {command!r}; commands: {', '.join([*OWN, *TOOLS])} (mimscale --help)", file=sys.stderr)
    return 2


def run() -> None:
    """The console script (setup.py's entry_points)."""
    sys.exit(main())

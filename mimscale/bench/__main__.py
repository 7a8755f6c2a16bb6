"""Throughput benchmarks (print numbers and JSON; never asserted in tests).

    python -m mimscale.bench step --method mae|amt|automae [--extractor online|ema|frozen|stored] --model vit_base --batch 16 --steps 3 [--vs-plain] --json
    python -m mimscale.bench loader --source pil|folder|wds|ffcv --path <data> --workers 2 --batch 64 --batches 20 --json
    python -m mimscale.bench convert --model vit_base|vit_large [--zero 1|2|3] --json
    python -m mimscale.bench decode --path <folder of JPEGs> [--images 1000] --json

``loader``: see mimscale/bench_loader.py; ``decode`` (where a loader's time goes): mimscale/bench_decode.py.

``step`` (mimscale/bench_step.py) builds the same Trainer and DeepSpeed engine as pretrain.py (on
one rank, or on every rank under torchrun), takes one synthetic batch onto the device (or reads
the run's loader: ``--data``), and times full training steps (forward, backward, optimizer) after
warm-up ones; ``--vs-plain`` times the plain-torch reference interleaved with them. MFU =
analytic FLOPs per image x img/s / peak FLOP/s of the device (a table for GPUs, a timed fp32
matmul on CPUs). ``python -m benchmarks.gpu`` runs the matrix of step benches a GPU node needs.
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as pretrain.py: before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import safetensors.torch  # noqa: E402

from mimscale import bench_step as step_bench  # noqa: E402
from mimscale import methods  # noqa: E402
from mimscale.bench.decode import add_decode_parser, bench_decode  # noqa: E402
from mimscale.bench.loader import add_parser, bench_loader  # noqa: E402
from mimscale.checkpoint.reshard import DONE as UNIVERSAL_DONE  # noqa: E402
from mimscale.checkpoint.reshard import convert  # noqa: E402
from mimscale.data.loader import build_loader  # noqa: E402
from mimscale.errors import ConfigError  # noqa: E402
from mimscale.masking.automae import EXTRACTORS  # noqa: E402
from mimscale.models.registry import ENCODERS  # noqa: E402
from mimscale.models.vit import ViTEncoder  # noqa: E402
from mimscale.runtime import dist  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The methods with a ViT-B preset, by the name bench takes (the registry's alias where it has one: mae)
PRESETS = {m.alias or m.name: m for m in methods.METHODS.values() if m.preset}


def _extractor_section(method) -> str | None:
    """The method's config section when it has an ``extractor`` key (what ``--extractor`` sets)."""
    if method.section is None or "extractor" not in {f.name for f in dataclasses.fields(method.section[1])}:
        return None
    return method.section[0]


def _extractor_overrides(args, section: str, tmp: Path) -> list[str]:
    """The extractor to time; ``frozen`` gets a freshly initialized encoder saved as a timm-format
    safetensors file (its cost is what is measured, not its weights)."""
    sets = [f"masking.{section}.extractor={args.extractor}"]
    if args.extractor == "frozen":
        img = next((s.split("=", 1)[1] for s in args.set if s.startswith("model.img_size=")), "224")
        patch = next((s.split("=", 1)[1] for s in args.set if s.startswith("model.patch_size=")), None)
        enc = ViTEncoder(ENCODERS[args.model], img_size=int(img), patch_size=int(patch) if patch else None)
        path = tmp / "extractor.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
        sets.append(f"masking.{section}.extractor_checkpoint={path}")
    return sets


def extractor_overrides(args, tmp: Path) -> tuple[list[str], str | None]:
    """(overrides, section): what ``--extractor`` sets, for methods that have one."""
    section = _extractor_section(PRESETS[args.method])
    return (_extractor_overrides(args, section, tmp) if section else []), section


def bench_convert(args) -> dict:
    """One optimizer step of the model, a checkpoint, and its conversion to DeepSpeed's universal
    checkpoint (what a resume on another world size or ZeRO stage does once, on rank 0)."""
    dist.ensure_env()
    tmp = Path(tempfile.mkdtemp(prefix="mimscale-bench-"))
    extra, _ = extractor_overrides(args, tmp)
    cfg = step_bench.bench_config(args, PRESETS, extra, tmp)
    trainer, eng = step_bench.build_trainer(args, cfg, tmp)
    loader, _ = build_loader(cfg.data, cfg.model.img_size, args.batch, 0, 1, cfg.train.seed)
    trainer.micro_step(*trainer.to_device(next(iter(loader))))
    t = time.perf_counter()
    tag = trainer.checkpointer.save(1)
    save_s = time.perf_counter() - t
    ckpt_bytes = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
    universal = convert(tag, workers=args.workers)
    done = json.loads((universal / UNIVERSAL_DONE).read_text())  # what convert measured: seconds and bytes
    convert_s, uc_bytes = done["seconds"], done["bytes"]
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    result = {"bench": "convert", "model": args.model, "method": args.method, "params": params, "zero_stage": eng.zero_stage,
              "precision": eng.precision, "checkpoint_gib": ckpt_bytes / 2**30, "save_s": save_s, "universal_gib": uc_bytes / 2**30,
              "convert_s": convert_s, "workers": args.workers, "cpus": os.cpu_count()}
    dist.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def bench_step(args) -> dict | None:
    return step_bench.bench_step(args, PRESETS, extractor_overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimscale.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    step_bench.add_step_parser(sub, PRESETS, EXTRACTORS)
    c = sub.add_parser("convert", help="time a checkpoint's conversion to DeepSpeed's universal format (elastic resume)")
    c.add_argument("--method", default="mae", choices=sorted(PRESETS))
    c.add_argument("--extractor", default="online", choices=EXTRACTORS, help="as for step")
    c.add_argument("--model", default="vit_base")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--zero", type=int, default=1, choices=(1, 2, 3))
    c.add_argument("--ds-config", default=None, help="base ds_config (default: ds_configs/{gpu_bf16,cpu_fp32}_zeroN.json)")
    c.add_argument("--workers", type=int, default=4, help="the converter's extract/merge processes")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    c.add_argument("--json", action="store_true", help="print only the JSON result")
    c.set_defaults(data="synthetic", compile=False)
    add_parser(sub)
    add_decode_parser(sub)
    args = p.parse_args(argv)
    try:
        result = {"step": bench_step, "convert": bench_convert, "loader": bench_loader, "decode": bench_decode}[args.what](args)
    except ConfigError as e:
        print(f"mimscale.bench: configuration error: {e}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0 of a multi-rank step bench
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

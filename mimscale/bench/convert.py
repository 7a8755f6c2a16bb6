"""``python -m mimscale.bench convert``: one optimizer step, a checkpoint, and its conversion to
DeepSpeed's universal checkpoint (what a resume on another world size or ZeRO stage does once)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mimscale.bench.step import PRESETS, bench_config, build_trainer, extractor_overrides
from mimscale.checkpoint.reshard import DONE as UNIVERSAL_DONE
from mimscale.checkpoint.reshard import convert
from mimscale.data.loader import build_loader
from mimscale.masking.automae import EXTRACTORS
from mimscale.runtime import dist


def bench_convert(args) -> dict:
    """One optimizer step of the model, a checkpoint, and its conversion to DeepSpeed's universal
    checkpoint (what a resume on another world size or ZeRO stage does once, on rank 0)."""
    dist.ensure_env()
    tmp = Path(tempfile.mkdtemp(prefix="mimscale-bench-"))
    extra, _ = extractor_overrides(args, tmp)
    cfg = bench_config(args, extra, tmp)
    trainer, eng = build_trainer(args, cfg, tmp)
    loader, _ = build_loader(cfg.data, img_size=cfg.model.img_size, micro_batch=args.batch, rank=0, world_size=1, seed=cfg.train.seed)
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


def add_convert_parser(sub) -> None:
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

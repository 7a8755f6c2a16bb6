"""``python -m mimscale.bench convert``: one optimizer step, a checkpoint, and its conversion to
DeepSpeed's universal checkpoint (what a resume on another world size or ZeRO stage does once).
``--no-convert`` times the checkpoint's save alone (``save_s``; ``save_stall_s`` the part that stalls
a training loop, see train.ckpt_background), on one rank or on every rank under
torchrun (ZeRO shards are written by every rank): the save case of ``python -m benchmarks.gpu``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mimscale.bench.step import PRESETS, bench_config, build_trainer, extractor_overrides, memory_fields, sync
from mimscale.checkpoint.reshard import DONE as UNIVERSAL_DONE
from mimscale.checkpoint.reshard import convert
from mimscale.data.loader import build_loader
from mimscale.masking.automae import EXTRACTORS
from mimscale.runtime import dist


def bench_convert(args) -> dict | None:
    """One optimizer step of the model, a checkpoint, and its conversion to DeepSpeed's universal
    checkpoint (what a resume on another world size or ZeRO stage does once, on rank 0); with
    ``--no-convert`` the save alone. Rank 0 returns the result, other ranks None."""
    dist.ensure_env()
    tmp = Path(tempfile.mkdtemp(prefix="mimscale-bench-"))
    extra, _ = extractor_overrides(args, tmp)
    cfg = bench_config(args, extra, tmp)
    trainer, eng = build_trainer(args, cfg, tmp)
    loader, _ = build_loader(cfg.data, img_size=cfg.model.img_size, micro_batch=args.batch, rank=0, world_size=1, seed=cfg.train.seed)
    trainer.micro_step(*trainer.to_device(next(iter(loader))))
    sync(trainer.device)  # the step's kernels are not the save's
    t = time.perf_counter()
    # save_stall_s: what the loop stands still for (train.ckpt_background: the staging copy only);
    # save_s: until every rank's files are fsynced and the marker is out (barriers inside)
    tag = trainer.checkpointer.save(1)
    stall_s = time.perf_counter() - t
    trainer.checkpointer.finish_pending()
    save_s = time.perf_counter() - t
    trainer.checkpointer.close()
    rank0 = dist.is_rank0()
    ckpt_bytes = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()) if rank0 else 0
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    result = {"bench": "convert" if args.convert else "save", "model": args.model, "method": args.method, "params": params,
              "zero_stage": eng.zero_stage, "precision": eng.precision, "world_size": dist.world_size(),
              "checkpoint_gib": ckpt_bytes / 2**30, "save_s": save_s, "save_stall_s": stall_s,
              "save_background": trainer.checkpointer.background,
              "save_gib_per_s": ckpt_bytes / 2**30 / save_s if save_s > 0 else None, **memory_fields(trainer.device)}
    if args.convert and rank0:
        universal = convert(tag, workers=args.workers)
        done = json.loads((universal / UNIVERSAL_DONE).read_text())  # what convert measured: seconds and bytes
        result.update(universal_gib=done["bytes"] / 2**30, convert_s=done["seconds"], workers=args.workers, cpus=os.cpu_count())
    dist.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    return result if rank0 else None


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="time a checkpoint's conversion to DeepSpeed's universal format (elastic resume)")
    c.add_argument("--method", default="mae", choices=sorted(PRESETS))
    c.add_argument("--extractor", default="online", choices=EXTRACTORS, help="as for step")
    c.add_argument("--model", default="vit_base")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--zero", type=int, default=1, choices=(1, 2, 3))
    c.add_argument("--ds-config", default=None, help="base ds_config (default: ds_configs/{gpu_bf16,cpu_fp32}_zeroN.json)")
    c.add_argument("--workers", type=int, default=4, help="the converter's extract/merge processes")
    c.add_argument("--no-convert", dest="convert", action="store_false",
                   help="time the checkpoint's save alone (save_s; on every rank under torchrun), no conversion")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    c.add_argument("--json", action="store_true", help="print only the JSON result")
    c.set_defaults(data="synthetic", compile=False)

"""Throughput benchmarks (print numbers and JSON; never asserted in tests).

    python -m mimscale.bench step --method mae|amt|automae [--extractor online|ema|frozen|stored] --model vit_base --batch 16 --steps 3 --json
    python -m mimscale.bench loader --source pil|folder|wds|ffcv --path <data> --workers 2 --batch 64 --batches 20 --json
    python -m mimscale.bench convert --model vit_base|vit_large [--zero 1|2|3] --json

``loader``: see mimscale/bench_loader.py.

``step`` builds the same Trainer and DeepSpeed engine as pretrain.py (world size 1), takes one
synthetic batch onto the device, and times full training steps (forward, backward, optimizer)
after warm-up ones. MFU = analytic FLOPs per image x img/s / peak FLOP/s of the device (a table
for GPUs, a timed fp32 matmul on CPUs).
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as pretrain.py: before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from mimscale import dist, methods  # noqa: E402
from mimscale.bench_loader import add_parser, bench_loader  # noqa: E402
from mimscale.config import ConfigError, load_config  # noqa: E402
from mimscale.data.loader import build_loader  # noqa: E402
from mimscale.ds_config import load_ds_config  # noqa: E402
from mimscale.elastic import DONE as UNIVERSAL_DONE  # noqa: E402
from mimscale.elastic import convert  # noqa: E402
from mimscale.engine import Trainer  # noqa: E402
from mimscale.masking.automae import EXTRACTORS  # noqa: E402
from mimscale.metrics import cpu_matmul_peak, model_flops_per_image, peak_flops  # noqa: E402
from mimscale.models.registry import ENCODERS  # noqa: E402
from mimscale.models.vit import ViTEncoder  # noqa: E402
from mimscale.optim import build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The methods with a ViT-B preset, by the name bench takes (the registry's alias where it has one: mae)
PRESETS = {m.alias or m.name: m for m in methods.METHODS.values() if m.preset}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def bench_trainer(args):
    """(trainer, cfg, eng, extractor section, tmp dir): the Trainer pretrain.py would build for
    ``args`` on one rank, global batch = micro batch = ``args.batch``, synthetic data."""
    dist.ensure_env()
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="mimscale-bench-"))
    base = args.ds_config or REPO / "ds_configs" / (f"gpu_bf16_zero{args.zero}.json" if cuda else f"cpu_fp32_zero{args.zero}.json")
    ds = json.loads(Path(base).read_text())
    ds.pop("train_batch_size", None)
    ds.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1)
    ds_path = tmp / "ds_config.json"
    ds_path.write_text(json.dumps(ds))
    extractor = _extractor_section(PRESETS[args.method])
    overrides = [
        f"model.name={args.model}",
        methods.select(args.method),
        "data.source=synthetic",
        f"data.synthetic_count={args.batch * 2}",
        "data.num_workers=0",
        "tracking.enabled=false",
        f"output_dir={tmp / 'run'}",
        "resume=never",
        "train.steps=1000",
        "train.warmup_steps=10",
        f"train.global_batch={args.batch}",
        f"train.compile={str(getattr(args, 'compile', False)).lower()}",
        f"train.threads={args.threads}",
        *(_extractor_overrides(args, extractor, tmp) if extractor else []),
        *args.set,
    ]
    cfg = load_config(REPO / "mimscale" / "configs" / PRESETS[args.method].preset, overrides)
    if getattr(args, "no_deepspeed", False):
        return None, cfg, None, extractor, tmp
    eng = load_ds_config(ds_path, 1, cfg.train.global_batch)
    dist.init_distributed()
    trainer = Trainer(cfg, SimpleNamespace(deepspeed_config=str(ds_path), local_rank=0, deepspeed=True), eng)
    return trainer, cfg, eng, extractor, tmp


def bench_convert(args) -> dict:
    """One optimizer step of the model, a checkpoint, and its conversion to DeepSpeed's universal
    checkpoint (what a resume on another world size or ZeRO stage does once, on rank 0)."""
    trainer, cfg, eng, _, tmp = bench_trainer(args)
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


def bench_step(args) -> dict:
    cuda = torch.cuda.is_available()
    trainer, cfg, eng, extractor, tmp = bench_trainer(args)
    if trainer is None:
        return bench_step_plain(args, cfg)
    refresh = None
    if trainer.method.uses_store(cfg):
        # AMT's store: fill it so the timed steps mask *and throw*; time it on the way
        refresh = {"seconds": trainer.hooks.refresh(1, 0), "images": len(trainer.source)}
    loader, _ = build_loader(cfg.data, cfg.model.img_size, args.batch, 0, 1, cfg.train.seed)
    images, meta = trainer.to_device(next(iter(loader)))
    for _ in range(args.warmup):
        trainer.micro_step(images, meta)
    _sync(trainer.device)
    trainer._update_plan_sizes()  # FLOPs of the plan the timed steps use
    times, fwd_bwd = [], []
    engine = trainer.engine
    for _ in range(args.steps):
        # The same calls as Trainer.micro_step, timed in two parts: model compute (forward +
        # backward) and the engine's optimizer step (gradient reduction, ZeRO buffers, AdamW).
        t = time.perf_counter()
        loss, _ = engine(images, meta)
        engine.backward(loss)
        _sync(trainer.device)
        t_mid = time.perf_counter()
        engine.step()
        trainer.hooks.after_optimizer_step()  # EMA copies: the update is part of the step
        _sync(trainer.device)
        times.append(time.perf_counter() - t)
        fwd_bwd.append(t_mid - t)
    step_s = statistics.median(times)
    fwd_bwd_s = statistics.median(fwd_bwd)
    img_s = args.batch / step_s
    # Re-measure the peak right after the steps, on the same threads, and keep the higher of the
    # two probes: a peak measured low (a noisy neighbour) would flatter the MFU.
    peak = trainer.peak
    if trainer.device.type == "cpu":
        peak = max(peak, cpu_matmul_peak())
    result = {
        "bench": "step",
        "method": args.method,
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "precision": eng.precision,
        "zero_stage": eng.zero_stage,
        "compile": args.compile,
        "step_s": step_s,
        "step_times": times,
        "img_per_s": img_s,
        "gflop_per_img": trainer.flops_per_img / 1e9,
        "peak_gflops": peak / 1e9,
        "peak_source": trainer.peak_source,
        "mfu": trainer.flops_per_img * img_s / peak if peak else None,
        "fwd_bwd_s": fwd_bwd_s,
        "optimizer_s": step_s - fwd_bwd_s,
        "mfu_fwd_bwd": trainer.flops_per_img * args.batch / fwd_bwd_s / peak if peak else None,
        "plan": dict(zip(("visible", "masked", "thrown"), trainer.plan_sizes)),
    }
    if extractor:
        result["extractor"] = args.extractor
    if refresh is not None:
        # one refresh's cost in training steps' time, per image: x 100 = % of an epoch it costs
        # (then / refresh_every epochs = its share of the whole run)
        result["refresh_s_per_img"] = refresh["seconds"] / refresh["images"]
        result["refresh_pct_of_epoch"] = 100.0 * result["refresh_s_per_img"] / (step_s / args.batch)
    if cuda:
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    dist.shutdown()
    return result


def bench_step_plain(args, cfg) -> dict:
    """The same model, batch and fused AdamW in plain torch (no DeepSpeed engine, one process):
    the reference that shows what the engine's own work costs."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    threads = dist.set_threads(args.threads)
    dist.seed_all(cfg.train.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = methods.build_model(cfg).to(device=device, dtype=dtype)
    opt = build_optimizer(model, 1e-4, cfg.train.weight_decay)
    loader, _ = build_loader(cfg.data, cfg.model.img_size, args.batch, 0, 1, cfg.train.seed)
    batch = next(iter(loader))
    images = batch["image"].to(device)
    meta = {k: batch[k].to(device) for k in ("box", "flip", "index")}
    if methods.of(cfg).uses_store(cfg):  # stand-in attention maps (no store without the trainer): masking and throwing
        meta["attn"] = torch.rand(images.shape[0], model.encoder.num_patches, device=device).half()

    def fwd_bwd():
        loss, _ = model(images, meta)
        loss.backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        fwd_bwd(), step()
    times, fb = [], []
    for _ in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        fwd_bwd()
        _sync(device)
        t_mid = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
        fb.append(t_mid - t)
    step_s, fwd_bwd_s = statistics.median(times), statistics.median(fb)
    peak, source = peak_flops(device)
    if device.type == "cpu":
        peak = max(peak, peak_flops(device)[0])
    visible, masked = model.last_plan.visible.shape[1], model.last_plan.masked.shape[1]
    flops = model_flops_per_image(cfg, visible, masked)
    img_s = args.batch / step_s
    return {
        "bench": "step", "engine": "torch (no deepspeed)", "method": args.method, "model": args.model,
        "batch": args.batch, "steps": args.steps,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({threads} threads)",
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "step_s": step_s, "step_times": times, "img_per_s": img_s, "gflop_per_img": flops / 1e9,
        "peak_gflops": peak / 1e9 if peak else None, "peak_source": source,
        "mfu": flops * img_s / peak if peak else None,
        "fwd_bwd_s": fwd_bwd_s, "optimizer_s": step_s - fwd_bwd_s,
        "mfu_fwd_bwd": flops * args.batch / fwd_bwd_s / peak if peak else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimscale.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="time full training steps of one method")
    s.add_argument("--method", default="mae", choices=sorted(PRESETS))
    s.add_argument("--extractor", default="online", choices=EXTRACTORS,
                   help="methods with an extractor (automae): where the generator's attention maps come from")
    s.add_argument("--model", default="vit_base")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--zero", type=int, default=1, choices=(1, 2, 3))
    s.add_argument("--ds-config", default=None, help="base ds_config (default: ds_configs/{gpu_bf16,cpu_fp32}_zeroN.json)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPU)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    s.add_argument("--no-deepspeed", action="store_true", help="plain torch reference: same model and AdamW, no engine")
    s.add_argument("--json", action="store_true", help="print only the JSON result")
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
    add_parser(sub)
    args = p.parse_args(argv)
    try:
        result = {"step": bench_step, "convert": bench_convert, "loader": bench_loader}[args.what](args)
    except ConfigError as e:
        print(f"mimscale.bench: configuration error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

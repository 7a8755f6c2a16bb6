"""``python -m mimscale.bench step``: timed training steps of one method (the command: mimscale/bench/cli.py).

The engine's step is timed on the same Trainer and DeepSpeed engine pretrain.py builds, on any
world size (``torchrun --nproc_per_node N -m mimscale.bench step ...``: the micro batch is
``--batch`` per rank, rank 0 prints). Data comes either from one synthetic batch kept on the
device (``--data synthetic``: the compute ceiling) or from the run's own loader (``--data
folder|wds|ffcv --data-path P``: each timed step waits for its batch, which is the data wait;
``--decode nvjpeg``: the batch is decoded on the device inside that wait, in ``h2d_s`` with its copy).

The plain-torch reference (``PlainStep``) is the same model, batch and fused AdamW without the
engine: ``--no-deepspeed`` times it alone; ``--vs-plain`` times it interleaved with the engine's
steps (engine, plain, engine, plain, ...) in one process, so machine noise falls on both alike,
and reports ``engine_over_plain`` = engine step / plain step (medians).
"""
from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch

from mimscale import methods, shipped
from mimscale.config import load_config
from mimscale.data.device_decode import check_available as check_decode
from mimscale.data.loader import build_loader
from mimscale.data.streams import open_stream
from mimscale.ds_config import load_ds_config
from mimscale.errors import ConfigError
from mimscale.hooks.amt_refresh import refresh_steps
from mimscale.masking.automae import EXTRACTORS
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder
from mimscale.optim import build_optimizer
from mimscale.runtime import dist
from mimscale.tracking.peak import peak_flops
from mimscale.trainer import Trainer

DATA_SOURCES = ("synthetic", "folder", "wds", "ffcv")
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
        # the encoder's own architecture (model.name at the bench's patch size), not the preset's timm name
        sets += [f"masking.{section}.extractor_checkpoint={path}", f"masking.{section}.extractor_model="]
    return sets


def extractor_overrides(args, tmp: Path) -> tuple[list[str], str | None]:
    """(overrides, section): what ``--extractor`` sets, for methods that have one."""
    section = _extractor_section(PRESETS[args.method])
    return (_extractor_overrides(args, section, tmp) if section else []), section




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_ds_config(zero: int, cuda: bool) -> Path:
    return shipped.path_of("ds_config", f"gpu_bf16_zero{zero}" if cuda else f"cpu_fp32_zero{zero}")  # inside the package: works installed


def data_overrides(args) -> list[str]:
    """The config overrides of ``--data``: a small synthetic set, or the run's own loader on
    ``--data-path`` with ``--workers`` workers."""
    decode = [f"data.decode={getattr(args, 'decode', 'cpu')}"]  # nvjpeg with synthetic or ffcv data: the config check names data.decode
    if args.data == "synthetic":
        return ["data.source=synthetic", f"data.synthetic_count={args.batch * 2 * max(1, dist.world_size())}", "data.num_workers=0",
                *decode]
    if not args.data_path:
        raise ConfigError(f"--data {args.data} needs --data-path (the folder, shard directory or .beton to read)")
    return [f"data.source={args.data}", f"data.path={args.data_path}", f"data.num_workers={args.workers}", *decode]


def bench_config(args, extra: list[str], tmp: Path):
    """The preset's Config for the bench: global batch = ``--batch`` x world size, no tracking."""
    overrides = [
        f"model.name={args.model}",
        methods.select(args.method),
        *data_overrides(args),
        "tracking.enabled=false",
        f"output_dir={tmp / 'run'}",
        "resume=never",
        "train.steps=1000",
        "train.warmup_steps=10",
        f"train.global_batch={args.batch * dist.world_size()}",
        f"train.compile={str(getattr(args, 'compile', False)).lower()}",
        f"train.threads={args.threads}",
        *extra,
        *args.set,
    ]
    return load_config(shipped.path_of("preset", PRESETS[args.method].preset), overrides)


def build_trainer(args, cfg, tmp: Path):
    """(trainer, engine settings): the Trainer pretrain.py would build for ``cfg`` on this world
    (micro batch ``args.batch`` per rank, no accumulation)."""
    cuda = torch.cuda.is_available()
    ds = json.loads(Path(args.ds_config or default_ds_config(args.zero, cuda)).read_text())
    ds.pop("train_batch_size", None)
    ds.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1)
    ds_path = tmp / f"ds_config-rank{dist.rank()}.json"  # one writer per file
    ds_path.write_text(json.dumps(ds))
    eng = load_ds_config(ds_path, dist.world_size(), cfg.train.global_batch, clip_grad=cfg.train.clip_grad)
    dist.init_distributed(cfg.dist.timeout_minutes)
    trainer = Trainer(cfg, SimpleNamespace(deepspeed_config=str(ds_path), local_rank=dist.local_rank(), deepspeed=True), eng)
    return trainer, eng


class PlainStep:
    """The same model, batch and fused AdamW in plain torch (no DeepSpeed engine, one process):
    the reference that shows what the engine's own work costs. bf16 weights on a GPU (no fp32
    master copy: a lower bound for DeepSpeed's bf16 path), fp32 on a CPU. ``optimizer=False``:
    the bare model's forward + backward alone (gradients dropped after each call), what
    ``bare_fwd_bwd_s`` times beside the step's ``fwd_bwd_s``."""

    def __init__(self, cfg, device: torch.device, images: torch.Tensor, meta: dict, optimizer: bool = True):
        dist.seed_all(cfg.train.seed)
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = methods.build_model(cfg).to(device=device, dtype=self.dtype)
        self.opt = build_optimizer(self.model, 1e-4, cfg.train.weight_decay) if optimizer else None
        self.images = images
        self.meta = {k: v for k, v in meta.items() if k != "noise"}
        if methods.of(cfg).uses_store(cfg) and "attn" not in self.meta:
            # stand-in attention maps [B, L] (no store without the trainer): the plan masks and throws
            self.meta["attn"] = torch.rand(images.shape[0], self.model.encoder.num_patches, device=device).half()

    def __call__(self) -> tuple[float, float]:
        """One step: (seconds, of which forward + backward)."""
        sync(self.device)
        t = time.perf_counter()
        loss, _ = self.model(self.images, self.meta)
        loss.backward()
        sync(self.device)
        t_mid = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
        self.model.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t, t_mid - t

    def flops_per_img(self, cfg) -> float:
        plan = self.model.last_plan
        return methods.flops(cfg, plan.visible.shape[1], plan.masked.shape[1])


class EngineStep:
    """One training step on a fixed device batch (synthetic) or on the next batch of a stream,
    through the Trainer's own step calls (the loop's: to_device, with_noise, forward_backward,
    optimizer_step), timed in parts: data wait (next batch), model compute (forward + backward,
    which under ZeRO includes the gradient reduction hooks) and the optimizer step (ZeRO buffers,
    AdamW, EMA copies)."""

    def __init__(self, trainer, images=None, meta=None, stream=None):
        self.trainer, self.images, self.meta, self.it = trainer, images, meta, iter(stream) if stream is not None else None
        # per stream step, inside the data wait: (host-to-device seconds, bytes) of the batch's copy
        self.h2d: list[tuple[float, int]] = []
        self.step = 0  # the optimizer step the masks' keyed noise is drawn for, as in the loop

    def __call__(self) -> tuple[float, float, float]:
        """(seconds, of which data wait, of which forward + backward)."""
        trainer = self.trainer
        sync(trainer.device)
        t = time.perf_counter()
        images, meta = self.images, self.meta
        if self.it is not None:
            batch = next(self.it)
            t_h2d = time.perf_counter()
            images, meta = trainer.to_device(batch)  # pinned host copies on a GPU (open_stream)
            sync(trainer.device)
            nbytes = sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
            self.h2d.append((time.perf_counter() - t_h2d, nbytes))
        meta = trainer.with_noise(meta, self.step, 0)
        t_data = time.perf_counter()
        trainer.forward_backward(images, meta)
        sync(trainer.device)
        t_mid = time.perf_counter()
        trainer.optimizer_step()  # EMA copies included: the update is part of the step
        sync(trainer.device)
        self.step += 1
        return time.perf_counter() - t, t_data - t, t_mid - t_data


def memory_fields(device: torch.device) -> dict:
    """Peak memory of this process: the GPU's allocator peak, or the host's max RSS on a CPU."""
    if device.type == "cuda":
        return {"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def refresh_share_of_run(cfg, pct_of_epoch: float) -> dict:
    """What the preset's whole schedule spends on refreshes: its number of refreshes (e.g. AMT's 400
    epochs refreshed every 40 from epoch 40: 9) x one refresh (% of an epoch of the timed steps) /
    the run's epochs. The timed steps mask and throw; the epochs before the first refresh run
    random masking, which is slower, so the true share is a little lower (an upper bound)."""
    sec = cfg.masking.amt  # AMT and AutoMAE-stored refresh on this schedule
    epochs = cfg.train.epochs
    steps_per_epoch = 1000  # any resolution: the schedule is in epochs or shares of the run
    n = len(refresh_steps(sec.first_refresh, sec.refresh_every, int(epochs * steps_per_epoch), steps_per_epoch))
    return {"run_epochs": epochs, "run_refreshes": n, "refresh_pct_of_run": pct_of_epoch * n / epochs}


def _stats(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def bench_step(args) -> dict | None:
    """The step benchmark's JSON (rank 0; other ranks return None)."""
    if args.vs_plain and args.data != "synthetic":
        raise ConfigError("--vs-plain compares compute on one fixed batch: use it with --data synthetic")
    dist.ensure_env()
    if args.no_deepspeed and dist.world_size() > 1:
        raise ConfigError("--no-deepspeed is the one-process reference: run it without torchrun/deepspeed")
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="mimscale-bench-"))
    extra, extractor = extractor_overrides(args, tmp)
    cfg = bench_config(args, extra, tmp)
    if args.no_deepspeed:
        return bench_plain(args, cfg)
    trainer, eng = build_trainer(args, cfg, tmp)
    check_decode(cfg.data.decode, cfg.data.source, trainer.device)  # data.decode=nvjpeg: is the device's decoder there?
    refresh = None
    primed = trainer.prime_method()  # AMT's store filled, so the timed steps mask *and throw*; timed on the way
    if primed is not None:
        refresh = {"seconds": primed, "images": len(trainer.source)}
    if args.data == "synthetic":
        loader, _ = build_loader(cfg.data, img_size=cfg.model.img_size, micro_batch=args.batch,
                                 rank=trainer.rank, world_size=trainer.world, seed=cfg.train.seed)
        images, meta = trainer.to_device(next(iter(loader)))
        step = EngineStep(trainer, images, meta)
    else:
        stream = open_stream(cfg.data, trainer.source, img_size=cfg.model.img_size, micro_batch=args.batch,
                             rank=trainer.rank, world_size=trainer.world, seed=cfg.train.seed,
                             pin_memory=cuda)
        step = EngineStep(trainer, stream=stream)
    plain = PlainStep(cfg, trainer.device, step.images, step.meta) if args.vs_plain else None
    # The bare model's forward + backward on the same batch, interleaved with the steps: what the
    # step's fwd_bwd_s costs over the model itself (--vs-plain: the plain step's own part).
    bare = None
    if not args.no_bare and step.images is not None:
        bare = plain or PlainStep(cfg, trainer.device, step.images, step.meta, optimizer=False)
    for _ in range(args.warmup):
        step()
        if bare:
            bare()
    trainer.refresh_plan_flops()  # FLOPs of the plan the timed steps use
    times, waits, fwd_bwd, plain_times, plain_fb = [], [], [], [], []
    for _ in range(args.steps):
        total, wait, fb = step()
        times.append(total), waits.append(wait), fwd_bwd.append(fb)
        if bare:  # interleaved: the same noise on both sides of the ratio
            p_total, p_fb = bare()
            plain_times.append(p_total), plain_fb.append(p_fb)
    step_s = statistics.median(times)
    img_s = args.batch / step_s
    # Re-measured right after the steps, on the same threads (the higher of this and the
    # Trainer's probe: see peak_flops).
    peak, _ = peak_flops(trainer.device, at_least=trainer.peak)
    fwd_bwd_s = statistics.median(fwd_bwd)
    result = {
        "bench": "step",
        "method": args.method,
        "model": args.model,
        "batch": args.batch,
        "world_size": trainer.world,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "precision": eng.precision,
        "zero_stage": eng.zero_stage,
        "compile": args.compile,
        "data": args.data,
        "decode": cfg.data.decode,  # where the loader's JPEGs were decoded (data.decode); its device time is in data_wait_s
        "step_s": step_s,
        "step_times": times,
        "img_per_s": img_s,  # per rank (per GPU); the run's is x world_size
        "img_per_s_total": img_s * trainer.world,
        "gflop_per_img": trainer.flops_per_img / 1e9,
        "peak_gflops": peak / 1e9 if peak else None,
        "peak_source": trainer.peak_source,
        "mfu": trainer.flops_per_img * img_s / peak if peak else None,
        "fwd_bwd_s": fwd_bwd_s,
        "optimizer_s": statistics.median([t - w - f for t, w, f in zip(times, waits, fwd_bwd)]),
        "mfu_fwd_bwd": trainer.flops_per_img * args.batch / fwd_bwd_s / peak if peak else None,
        "data_wait_s": statistics.median(waits),
        "data_wait_pct": 100.0 * sum(waits) / sum(times),
        "plan": dict(zip(("visible", "masked", "thrown"), trainer.plan_sizes)),
        **memory_fields(trainer.device),
    }
    if bare is not None:
        result["bare_fwd_bwd_s"] = statistics.median(plain_fb)
        result["fwd_bwd_over_bare"] = fwd_bwd_s / result["bare_fwd_bwd_s"]
        result["fwd_bwd_over_bare_pairs"] = _stats([e / b for e, b in zip(fwd_bwd, plain_fb)])
    if step.h2d:  # a loader's batches: their copy to the device (pinned host memory on a GPU), within data_wait_s
        timed = step.h2d[-args.steps:]
        seconds, nbytes = sum(t for t, _ in timed), sum(b for _, b in timed)
        result.update(pin_memory=cuda, h2d_s=statistics.median(t for t, _ in timed), h2d_mib=nbytes / len(timed) / 2**20,
                      h2d_gib_per_s=nbytes / seconds / 2**30 if cuda and seconds > 0 else None)
    if extractor:
        result["extractor"] = args.extractor
    if refresh is not None:
        # one refresh's cost in training steps' time, per image: x 100 = % of an epoch it costs
        # (then / refresh_every epochs = its share of the whole run)
        result["refresh_s_per_img"] = refresh["seconds"] / refresh["images"]
        result["refresh_pct_of_epoch"] = 100.0 * result["refresh_s_per_img"] / (step_s / args.batch)
        result.update(refresh_share_of_run(cfg, result["refresh_pct_of_epoch"]))
    if plain is not None:
        result["plain"] = {"step_s": statistics.median(plain_times), "step_times": plain_times, "fwd_bwd_s": statistics.median(plain_fb),
                           "optimizer_s": statistics.median([t - f for t, f in zip(plain_times, plain_fb)])}
        ratios = [e / p for e, p in zip(times, plain_times)]  # per interleaved pair
        result["engine_over_plain"] = step_s / result["plain"]["step_s"]
        result["engine_over_plain_pairs"] = _stats(ratios)
    rank0 = dist.is_rank0()
    dist.shutdown()
    return result if rank0 else None


def bench_plain(args, cfg) -> dict:
    """``--no-deepspeed``: the plain-torch reference alone."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    threads = dist.set_threads(args.threads)
    dist.seed_all(cfg.train.seed)
    loader, _ = build_loader(cfg.data, img_size=cfg.model.img_size, micro_batch=args.batch, rank=0, world_size=1, seed=cfg.train.seed)
    batch = next(iter(loader))
    images = batch["image"].to(device)
    meta = {k: batch[k].to(device) for k in ("box", "flip", "index")}
    plain = PlainStep(cfg, device, images, meta)
    for _ in range(args.warmup):
        plain()
    times, fb = [], []
    for _ in range(args.steps):
        total, f = plain()
        times.append(total), fb.append(f)
    step_s, fwd_bwd_s = statistics.median(times), statistics.median(fb)
    peak, source = peak_flops(device)
    peak, _ = peak_flops(device, at_least=peak)  # a second probe after the steps: the higher of the two
    flops = plain.flops_per_img(cfg)
    img_s = args.batch / step_s
    return {
        "bench": "step", "engine": "torch (no deepspeed)", "method": args.method, "model": args.model,
        "batch": args.batch, "world_size": 1, "steps": args.steps,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({threads} threads)",
        "precision": "bf16" if plain.dtype == torch.bfloat16 else "fp32", "data": args.data,
        "step_s": step_s, "step_times": times, "img_per_s": img_s, "img_per_s_total": img_s, "gflop_per_img": flops / 1e9,
        "peak_gflops": peak / 1e9 if peak else None, "peak_source": source,
        "mfu": flops * img_s / peak if peak else None,
        "fwd_bwd_s": fwd_bwd_s, "optimizer_s": step_s - fwd_bwd_s,
        "mfu_fwd_bwd": flops * args.batch / fwd_bwd_s / peak if peak else None,
        "data_wait_s": 0.0, "data_wait_pct": 0.0, **memory_fields(device),
    }


def add_step_parser(sub) -> None:
    s = sub.add_parser("step", help="time full training steps of one method")
    s.add_argument("--method", default="mae", choices=sorted(PRESETS))
    s.add_argument("--extractor", default="online", choices=EXTRACTORS,
                   help="methods with an extractor (automae): where the generator's attention maps come from")
    s.add_argument("--model", default="vit_base")
    s.add_argument("--batch", type=int, default=16, help="micro batch per rank")
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    s.add_argument("--ds-config", default=None, help="base ds_config (default: ds_configs/{gpu_bf16,cpu_fp32}_zeroN.json)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPU)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores shared by this node's ranks)")
    s.add_argument("--data", default="synthetic", choices=DATA_SOURCES,
                   help="synthetic: one batch kept on the device; folder|wds|ffcv: the run's loader on --data-path (data wait counts)")
    s.add_argument("--data-path", default="", help="--data folder|wds|ffcv: the ImageNet root, shard directory or .beton")
    s.add_argument("--workers", type=int, default=8, help="--data folder|wds|ffcv: loader workers (ffcv: threads)")
    s.add_argument("--decode", default="cpu", choices=("cpu", "nvjpeg"),
                   help="--data folder|wds: data.decode (nvjpeg: the workers read bytes, the device decodes; in the data wait)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    s.add_argument("--no-deepspeed", action="store_true", help="plain torch reference alone: same model and AdamW, no engine")
    s.add_argument("--vs-plain", action="store_true",
                   help="also time the plain-torch reference, interleaved step by step, and report engine_over_plain")
    s.add_argument("--no-bare", action="store_true",
                   help="skip bare_fwd_bwd_s (the bare model's forward + backward on the same batch, interleaved with the steps; "
                        "it keeps a second copy of the model in memory)")
    s.add_argument("--json", action="store_true", help="print only the JSON result")

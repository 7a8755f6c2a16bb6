"""Memory planner: per-GPU memory of a preset under each ZeRO stage and activation checkpointing,
the largest micro batch that fits, and the settings for the preset's global batch.

    python -m mimscale.plan --config mimscale/configs/mae_vit_huge.yaml \
        --deepspeed_config ds_configs/gpu_bf16_zero1.json --gpus 64 --gpu-mem-gib 80 [--json]

Per GPU, for ZeRO stages 1-3 x model.grad_ckpt 0, 1 (and the preset's own value):
  model states  parameters, gradients, AdamW states: DeepSpeed's estimators (planning/model_states.py)
  buffers       the model's buffers, DeepSpeed's reduce / prefetch buckets (from the ds_config), and
                the CUDA context with NCCL's buffers (--context-gib, not seen by torch's allocator)
  activations   what the method's forward keeps for the backward at the micro batch, traced on the
                meta device (planning/activations.py), plus the backward's transient tensors
  margin        --margin x (states + buffers + activations): the caching allocator's fragmentation
Precision (--precision, default: the ds_config's) and the attention kernel (--attention, default
fused: flash / memory-efficient SDPA on GPUs, torch's CPU flash kernel on CPUs) are inputs.

The recommendation, for train.global_batch on --gpus GPUs: micro x accumulation x GPUs = global
batch, with the first choice that fits a micro batch of at least --min-micro, in this order: no
checkpointing before checkpointing (it recomputes the blocks' forward), then the lowest ZeRO stage
(less communication); the largest micro batch that divides the per-GPU batch and fits. Bad input
exits 2 with a message naming the option. docs/memory.md: what the numbers mean, their validation.
"""
from __future__ import annotations

import contextlib
import sys

# DeepSpeed's logger writes to the sys.stdout of its first import (its accelerator line among
# others): imported with stdout pointing at stderr, stdout carries the plan alone (--json pipes).
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from mimscale import methods, shipped  # noqa: E402
from mimscale.config import load_config  # noqa: E402
from mimscale.ds_config import load_ds_config  # noqa: E402
from mimscale.errors import EXIT_CONFIG, ConfigError  # noqa: E402
from mimscale.planning import model_states as ms  # noqa: E402
from mimscale.planning.activations import ATTENTION, DTYPES, ActivationEstimate, estimate_activations, meta_model  # noqa: E402

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Row:
    """One (ZeRO stage, grad_ckpt) choice on one GPU."""

    stage: int
    grad_ckpt: int
    states: ms.ModelStates
    buffers: dict  # name -> bytes (DeepSpeed's buckets, the model's buffers)
    act: ActivationEstimate
    margin: float  # fraction of what the allocator holds
    context: float  # bytes outside the allocator (CUDA context, NCCL)

    def allocated(self, micro: int) -> float:
        return self.states.total + sum(self.buffers.values()) + self.act.total(micro)

    def total(self, micro: int) -> float:
        return self.allocated(micro) * (1 + self.margin) + self.context

    def max_micro(self, mem: float) -> int:
        """The largest micro batch whose total fits ``mem`` bytes (0: not even one image)."""
        room = (mem - self.context) / (1 + self.margin) - self.states.total - sum(self.buffers.values()) - self.act.saved_fixed
        per = self.act.saved_per_image + self.act.transient_per_image
        m = max(0, int(room // per))
        while m > 0 and self.total(m) > mem:  # guard against rounding at the boundary
            m -= 1
        return m


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mimscale.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML preset: a file or a shipped preset's name (mimscale presets)")
    p.add_argument("--deepspeed_config", required=True,
                   help="DeepSpeed JSON (a file or a shipped name, e.g. gpu_bf16_zero1): precision, buckets, micro batch")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (data-parallel ranks)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys: --set a.b=1 c.d=2 (repeatable)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="micro batch of the table's GiB columns (default: train.micro_batch, else the ds_config's)")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None, help="default: the ds_config's (bf16 if enabled, else fp32)")
    p.add_argument("--attention", choices=ATTENTION, default="fused",
                   help="fused: flash / memory-efficient SDPA (GPUs) or torch's CPU flash kernel; math: the N x N softmax kept")
    p.add_argument("--margin", type=float, default=0.10, help="fragmentation margin, a fraction of allocated memory (default 0.10)")
    p.add_argument("--context-gib", type=float, default=1.0, help="CUDA context and NCCL buffers per GPU in GiB (default 1.0)")
    p.add_argument("--min-micro", type=int, default=32,
                   help="a recommended micro batch should reach this (or the per-GPU batch if smaller): smaller ones underuse a GPU")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    for flag, value, ok, what in (
        ("--gpus", args.gpus, args.gpus >= 1, "a positive integer"),
        ("--gpu-mem-gib", args.gpu_mem_gib, args.gpu_mem_gib > 0, "> 0"),
        ("--micro-batch", args.micro_batch, args.micro_batch is None or args.micro_batch >= 1, "a positive integer"),
        ("--margin", args.margin, 0 <= args.margin < 1, "in [0, 1)"),
        ("--context-gib", args.context_gib, 0 <= args.context_gib < args.gpu_mem_gib, "in [0, --gpu-mem-gib)"),
        ("--min-micro", args.min_micro, args.min_micro >= 1, "a positive integer"),
    ):
        if not ok:
            p.error(f"argument {flag}: must be {what}, got {value}")
    try:  # a file, or the name of a shipped one (mae_vit_base, gpu_bf16_zero1), kept as given for the advice
        shipped.resolve_preset(args.config), shipped.resolve_ds_config(args.deepspeed_config)
    except ConfigError as e:
        p.error(str(e))
    return args


def sibling_ds_config(path: str, stage: int) -> str | None:
    """The ds_config beside ``path`` that differs in its ZeRO stage only by name (gpu_bf16_zero1.json
    -> gpu_bf16_zero3.json; a shipped name gpu_bf16_zero1 -> gpu_bf16_zero3), if it exists."""
    p = Path(path)
    if not re.search(r"zero\d", p.name):
        return None
    other = p.with_name(re.sub(r"zero\d", f"zero{stage}", p.name))
    if not p.is_file():  # a shipped name: its sibling's name
        return other.name if other.name in shipped.names("ds_config") else None
    return str(other) if other.is_file() else None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def recommend(rows: list[Row], gpus: int, global_batch: int, mem: float, min_micro: int) -> tuple[dict | None, str]:
    """(the chosen settings or None, a sentence on why / what must change)."""
    if global_batch % gpus:
        near = [g for g in divisors(global_batch) if gpus / 2 <= g <= 2 * gpus] or divisors(global_batch)[-3:]
        return None, (f"train.global_batch {global_batch} is not divisible by {gpus} GPUs: use a GPU count that divides it "
                      f"(near {gpus}: {', '.join(map(str, near))}) or another global batch")
    per_gpu = global_batch // gpus
    order = sorted(rows, key=lambda r: (r.grad_ckpt, r.stage))  # no recompute first, then the least communication
    floor = min(min_micro, per_gpu)
    skipped = []
    fallback = None
    for r in order:
        cap = r.max_micro(mem)
        fit = max((d for d in divisors(per_gpu) if d <= cap), default=0)
        if fit >= floor:
            why = "the lowest ZeRO stage without checkpointing that fits" if r is order[0] else "; ".join(skipped)
            return settings(r, fit, per_gpu, gpus), why
        if fit and (fallback is None or fit > fallback[1]):  # below the floor: the most images per micro step
            fallback = (r, fit)
        skipped.append(f"ZeRO-{r.stage} grad_ckpt {r.grad_ckpt}: " + (f"at most micro {cap} fits (below {floor})" if cap else "no micro batch fits"))
    if fallback is not None:
        r, fit = fallback
        return settings(r, fit, per_gpu, gpus), f"no choice fits micro {floor}; the one that fits the most. " + "; ".join(skipped)
    worst = max(order, key=lambda r: (r.stage, r.grad_ckpt))
    return None, (f"nothing fits {mem / GIB:.0f} GiB: ZeRO-{worst.stage} with grad_ckpt {worst.grad_ckpt} needs "
                  f"{worst.total(1) / GIB:.1f} GiB at micro batch 1 (model states {worst.states.total / GIB:.1f} GiB); use more GPUs "
                  "(ZeRO-3's model states per GPU fall as 1/N), GPUs with more memory, or a smaller model.img_size")


def settings(r: Row, micro: int, per_gpu: int, gpus: int) -> dict:
    return {"zero_stage": r.stage, "grad_ckpt": r.grad_ckpt, "micro_batch": micro, "grad_accum": per_gpu // micro, "gpus": gpus,
            "global_batch": per_gpu * gpus, "total_gib": round(r.total(micro) / GIB, 2)}


def build_plan(args) -> dict:
    cfg = load_config(args.config, args.overrides)
    ds = load_ds_config(args.deepspeed_config, world_size=1)  # its precision, buckets and micro batch; the split is planned here
    note = None if ds.zero_stage else "the ds_config is ZeRO-0 (nothing partitioned: ZeRO-1's model states at --gpus 1); the rows are ZeRO-1..3"
    precision = args.precision or ("bf16" if ds.bf16 else "fp32")
    micro = args.micro_batch or cfg.train.micro_batch or ds.micro_batch
    global_batch = cfg.train.global_batch or load_ds_config(args.deepspeed_config, world_size=args.gpus).global_batch
    model = meta_model(cfg, "fp32", 0)  # sizes only
    counts = ms.count_params(model)
    visible, masked, thrown = model.masker.initial_sizes()
    ckpts = sorted({0, 1, cfg.model.grad_ckpt})
    acts = {k: estimate_activations(cfg, precision, args.attention, k) for k in ckpts}
    accum32 = ms.grad_accum_fp32(ds.raw)
    mem = args.gpu_mem_gib * GIB
    rows = []
    for stage in ms.STAGES:
        zero = ms.zero_config(ds.raw, stage, args.deepspeed_config)
        st = ms.model_states(counts, stage, args.gpus, precision, zero, accum32)
        buf = ms.buffers(counts, stage, precision, zero, accum32)
        rows.extend(Row(stage, k, st, buf, acts[k], args.margin, args.context_gib * GIB) for k in ckpts)
    rec, why = recommend(rows, args.gpus, global_batch, mem, args.min_micro)
    if rec is not None:
        rec["deepspeed_config"] = sibling_ds_config(args.deepspeed_config, rec["zero_stage"])
        sets = [f"train.micro_batch={rec['micro_batch']}"] + ([f"model.grad_ckpt={rec['grad_ckpt']}"] if rec["grad_ckpt"] != cfg.model.grad_ckpt else [])
        json_arg = rec["deepspeed_config"] or f"<{args.deepspeed_config} with zero_optimization.stage {rec['zero_stage']}>"
        rec["args"] = f"--deepspeed_config {json_arg} --config {args.config} " + " ".join(f"--set {s}" for s in sets)
    return {
        "config": args.config, "deepspeed_config": args.deepspeed_config, "method": methods.of(cfg).name, "model": cfg.model.name,
        "img_size": cfg.model.img_size, "plan": {"visible": visible, "masked": masked, "thrown": thrown},
        "gpus": args.gpus, "gpu_mem_gib": args.gpu_mem_gib, "precision": precision, "attention": args.attention,
        "micro_batch": micro, "global_batch": global_batch, "note": note,
        "params": {"trainable": counts.trainable, "frozen": counts.frozen, "largest_layer": counts.largest_layer},
        "overheads": {"cuda_context_gib": args.context_gib, "margin": args.margin},
        "activations": [{"grad_ckpt": a.grad_ckpt, "saved_mib_per_image": round(a.saved_per_image / MIB, 3),
                         "transient_mib_per_image": round(a.transient_per_image / MIB, 3), "saved_fixed_mib": round(a.saved_fixed / MIB, 3),
                         "amt_store_phase": a.store_phase} for a in acts.values()],
        "rows": [row_json(r, micro, mem) for r in rows],
        "recommendation": rec, "why": why,
    }


def row_json(r: Row, micro: int, mem: float) -> dict:
    buf = sum(r.buffers.values()) + r.context
    return {"zero_stage": r.stage, "grad_ckpt": r.grad_ckpt, "model_states_gib": round(r.states.total / GIB, 3),
            "model_states": {"deepspeed_estimator_gib": round(r.states.deepspeed / GIB, 3),
                             **{f"{k}_gib": round(v / GIB, 3) for k, v in r.states.adjustments.items()}},
            "buffers_gib": round(buf / GIB, 3),
            "buffers": {**{f"{k}_gib": round(v / GIB, 3) for k, v in r.buffers.items()}, "cuda_context_gib": round(r.context / GIB, 3)},
            "activations_gib": round(r.act.total(micro) / GIB, 3), "margin_gib": round(r.allocated(micro) * r.margin / GIB, 3),
            "total_gib": round(r.total(micro) / GIB, 3), "fits": r.total(micro) <= mem, "max_micro_batch": r.max_micro(mem)}


def render(plan: dict) -> str:
    p = plan["plan"]
    lines = [
        f"{plan['config']} ({plan['method']}, {plan['model']} at {plan['img_size']} px: {p['visible']} visible, {p['masked']} masked, "
        f"{p['thrown']} thrown patches) with {plan['deepspeed_config']}",
        f"{plan['gpus']} GPUs x {plan['gpu_mem_gib']:g} GiB; {plan['precision']}, {plan['attention']} attention; "
        f"parameters {plan['params']['trainable'] / 1e6:.1f}M trained, {plan['params']['frozen'] / 1e6:.1f}M frozen",
    ]
    if plan["note"]:
        lines.append(plan["note"])
    for a in plan["activations"]:
        lines.append(f"activations per image, grad_ckpt {a['grad_ckpt']}: {a['saved_mib_per_image']:.1f} MiB kept for the backward "
                     f"+ {a['transient_mib_per_image']:.1f} MiB transient in it")
    lines += ["", f"per GPU, GiB, at micro batch {plan['micro_batch']}:",
              " ZeRO  grad_ckpt  model states  buffers  activations  margin   total  fits  max micro batch"]
    for r in plan["rows"]:
        lines.append(f"{r['zero_stage']:>5}  {r['grad_ckpt']:>9}  {r['model_states_gib']:>12.2f}  {r['buffers_gib']:>7.2f}  "
                     f"{r['activations_gib']:>11.2f}  {r['margin_gib']:>6.2f}  {r['total_gib']:>6.2f}  {'yes' if r['fits'] else 'no':>4}  "
                     f"{r['max_micro_batch']:>15}")
    b = plan["rows"][0]["buffers"]
    lines += ["model states: DeepSpeed's estimators (ZeRO-1: ZeRO-2's with whole gradients); buffers: DeepSpeed's buckets",
              f"  from the ds_config (ZeRO-1/2 reduce {b.get('reduce_buckets_gib', 0):.2f} GiB), the model's buffers, CUDA context + NCCL "
              f"{plan['overheads']['cuda_context_gib']:g} GiB; margin: {plan['overheads']['margin']:.0%} of allocated memory (fragmentation)", ""]
    rec = plan["recommendation"]
    if rec is None:
        lines.append(f"global batch {plan['global_batch']} on {plan['gpus']} GPUs: {plan['why']}")
    else:
        lines.append(f"recommended for global batch {rec['global_batch']} on {rec['gpus']} GPUs: ZeRO-{rec['zero_stage']}, grad_ckpt "
                     f"{rec['grad_ckpt']}, micro batch {rec['micro_batch']} x accumulation {rec['grad_accum']} x {rec['gpus']} GPUs "
                     f"({rec['total_gib']:.1f} GiB of {plan['gpu_mem_gib']:g})")
        lines.append(f"  why: {plan['why']}")
        lines.append(f"  pretrain.py {rec['args']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = build_plan(args)
    except ConfigError as e:
        print(f"mimscale.plan: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

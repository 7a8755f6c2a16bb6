"""The planner's activation estimate (mimscale/planning/activations.py: meta-device traces at batch 2
and 4, extrapolated) against what a real training forward keeps, at ViT-L and ViT-H widths, for
every method, on this machine's CPU at 224 px, batch 2 (real weights, real tensors):

  hooks     bytes of the distinct storages autograd saved (saved_tensors_hooks, keyed by data
            pointer, parameters and buffers left out) that are still alive after the forward
  held      what the forward allocated and did not free (torch.profiler's CPU memory events):
            autograd's saved tensors and anything else the step holds (the loss, the plan), and
            what checkpointed blocks keep, which saved-tensor hooks cannot see

Both within 10% of the estimate's bytes per image. The default case (MAE at ViT-L, fp32, fused
attention) runs in ``make test``; the rest are ``slow``. ``python -m tests.unit.test_plan_validation``
prints the table of docs/memory.md. On a GPU (skipped without one): the same against bf16 CUDA
tensors and against torch.cuda.max_memory_allocated over a forward and backward.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import time
import weakref

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from mimscale import methods
from mimscale.config import load_config
from mimscale.planning.activations import estimate_activations
from tests.conftest import make_batch

METHOD_NAMES = ["random", "amt", "automae", "simmim", "amt_simmim", "rmae", "cmae", "blockwise"]
WIDTHS = ("vit_large", "vit_huge")
BATCH = 2
TOLERANCE = 0.10
MIB = 2**20
FAST = {("random", "vit_large")}


def config(method: str, width: str, *sets: str):
    # SimMIM's 32-px unit is no multiple of ViT-H's 14-px patches: 28 px (2 x 2 patches), as simmim_vit_huge.yaml
    return load_config(None, [f"model.name={width}", methods.select(method), "masking.simmim.mask_patch_size=28" if width == "vit_huge"
                              else "masking.simmim.mask_patch_size=32", *sets])


class SavedBytes:
    """saved_tensors_hooks that record the distinct storages autograd saves, keyed by data pointer
    (parameters and buffers left out); ``live()``: the bytes of those still alive (a storage freed
    during the forward and its address reused counts once, as the new one)."""

    def __init__(self, model):
        self.skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.kept: dict[int, tuple[int, list]] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        t = t.detach()  # an output kept with its grad_fn would hold its own node: a cycle gc cannot free
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.skip and s.nbytes():
            entry = self.kept.get(ptr)
            if entry is None or all(r() is None for r in entry[1]):
                self.kept[ptr] = entry = (s.nbytes(), [])
            entry[1].append(weakref.ref(t))
        return t

    def live(self) -> int:
        return sum(n for n, refs in self.kept.values() if any(r() is not None for r in refs))


def measure(model, images, meta) -> tuple[int, int]:
    """(hooks, held) bytes of one real training forward (see the module docstring)."""
    saved = SavedBytes(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with saved.hooks:
            out = model(images, meta)
    hooks = saved.live()
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    del out
    return hooks, held


def compare(method: str, width: str, precision: str = "fp32", attention: str = "fused", grad_ckpt: int = 0) -> dict:
    """Estimate and real measurement per image, in MiB."""
    cfg = config(method, width, f"model.grad_ckpt={grad_ckpt}")
    est = estimate_activations(cfg, precision, attention, grad_ckpt)
    torch.manual_seed(0)
    model = methods.build_model(cfg).train()
    if precision == "bf16":  # as DeepSpeed's bf16 engine: parameters only
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    images, meta = make_batch(BATCH, cfg.model.img_size)
    if est.store_phase:  # the estimate's larger phase: with AMT's stored maps
        meta["attn"] = torch.rand(BATCH, model.encoder.num_patches, generator=torch.Generator().manual_seed(1)).half()
    with sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext():
        hooks, held = measure(model, images, meta)
    del model
    gc.collect()
    e = est.saved(BATCH) / BATCH / MIB
    return {"method": method, "width": width, "precision": precision, "attention": attention, "grad_ckpt": grad_ckpt,
            "estimate_mib": e, "hooks_mib": hooks / BATCH / MIB, "held_mib": held / BATCH / MIB}


def check(row: dict, against=("hooks", "held")) -> None:
    for k in against:
        measured = row[f"{k}_mib"]
        assert abs(row["estimate_mib"] - measured) <= TOLERANCE * measured, row


CASES = [pytest.param(m, w, marks=() if (m, w) in FAST else pytest.mark.slow, id=f"{m}-{w}") for w in WIDTHS for m in METHOD_NAMES]


@pytest.mark.parametrize("method, width", CASES)
def test_estimate_matches_a_real_cpu_forward(method, width):
    check(compare(method, width))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "simmim", "cmae"])
def test_checkpointing_matches_what_the_forward_holds(method):
    """grad_ckpt 1: a checkpointed block's input is held by torch.utils.checkpoint, not by a saved
    tensor; the profiler's held bytes see it."""
    check(compare(method, "vit_large", grad_ckpt=1), against=("held",))


@pytest.mark.slow
@pytest.mark.parametrize("precision, attention", [("bf16", "fused"), ("fp32", "math")])
def test_precision_and_math_attention_match_a_real_cpu_forward(precision, attention):
    check(compare("random", "vit_large", precision, attention))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["random", "simmim"])
def test_estimate_matches_a_gpu_step(method):
    """bf16 parameters on a GPU, its fused SDPA: the saved bytes within 10%, and the peak of a
    forward + backward over the memory before it (parameter gradients dropped as they arrive, as
    DeepSpeed moves them into its buckets) within 10% of the estimate's total (saved + transient)."""
    cfg = config(method, "vit_large")
    est = estimate_activations(cfg, "bf16", "fused", 0)
    torch.manual_seed(0)
    model = methods.build_model(cfg).cuda().train()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    batch = 32
    images, meta = make_batch(batch, cfg.model.img_size)
    images, meta = images.cuda(), {k: v.cuda() for k, v in meta.items()}
    recorder = SavedBytes(model)
    torch.cuda.synchronize()
    with recorder.hooks:
        loss, _ = model(images, meta)
    saved = recorder.live()
    loss.backward()
    del loss
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = model(images, meta)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert abs(est.saved(batch) - saved) <= TOLERANCE * saved, (est.saved(batch), saved)
    assert abs(est.total(batch) - peak) <= TOLERANCE * peak, (est.total(batch), peak)


def table(rows: list[dict]) -> str:
    lines = ["| method | width | run | estimate MiB/image | saved (hooks) MiB/image | diff | held (profiler) MiB/image | diff |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d1 = (r["estimate_mib"] - r["hooks_mib"]) / r["hooks_mib"]
        d2 = (r["estimate_mib"] - r["held_mib"]) / r["held_mib"]
        run = f"{r['precision']}, {r['attention']}, grad_ckpt {r['grad_ckpt']}"
        lines.append(f"| {r['method']} | {r['width']} | {run} | {r['estimate_mib']:.1f} | {r['hooks_mib']:.1f} | {d1:+.3%} | "
                     f"{r['held_mib']:.1f} | {d2:+.3%} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the table of docs/memory.md
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    cases = [(m, w, {}) for w in WIDTHS for m in METHOD_NAMES]
    cases += [("random", "vit_large", {"grad_ckpt": 1}), ("cmae", "vit_large", {"grad_ckpt": 1}),
              ("random", "vit_large", {"precision": "bf16"}), ("random", "vit_large", {"attention": "math"})]
    for m, w, kw in cases:
        t = time.time()
        rows.append(compare(m, w, **kw))
        print(rows[-1], f"{time.time() - t:.0f} s", file=sys.stderr)
    print(table(rows))

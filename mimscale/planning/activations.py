"""Activation memory of one training step, traced from the step itself.

The model is built on the meta device (shapes and dtypes, no storage), its parameters cast as
DeepSpeed casts the engine's module, and one training forward runs on a meta batch under
``torch.autograd.graph.saved_tensors_hooks``: the bytes of every distinct storage autograd keeps
for the backward are summed, parameters and buffers left out (they are model states, counted in
model_states.py). Views of one storage count once. Whatever a method's code saves is counted, so no
method needs a formula of its own: R-MAE's two passes, C-MAE's two online views, SimMIM's mask
tokens in the encoder, AutoMAE's generator and discriminator, every loss. Passes without grad
(C-MAE's EMA target, AutoMAE's extractors) keep nothing, as in a real step.

Inputs of the estimate:
  precision  bf16: parameters in bf16 (DeepSpeed's cast), so the activations they make are 2 bytes;
             what the kernels keep in fp32 stays fp32 (LayerNorm's mean and rstd, the losses
             computed in fp32, the attention's logsumexp). fp32: 4 bytes, as the CPU runs.
  attention  fused: flash / memory-efficient SDPA on GPUs, and torch's CPU flash kernel
             (``_scaled_dot_product_flash_attention_for_cpu``, what the CPU runs here) keep q, k, v,
             the output and a fp32 logsumexp [B, H, N]: O(N) per head. The meta device has no fused
             kernel (it decomposes SDPA), so the call is replaced by a stand-in that keeps exactly
             those. math: SDPA's decomposition (and timm's attention without fused_attn): scaled q,
             k^T, v and the N x N softmax [B, H, N, N] of every block.
  grad_ckpt  model.grad_ckpt (0 off, k: every k-th block, models/vit.run_blocks): a checkpointed
             block keeps its input only; its internals come back in the backward, one block at a
             time (``ActivationEstimate.transient_per_image``).

The estimate is linear in the micro batch B: traces at B = 2 and B = 4 give the fixed part and the
per-image part (a batch's samples share storages, so B images keep B times one image's bytes). Not
B = 1: a batch of one keeps a little more per image in places (a reshape of a size-1 dimension
that copies instead of viewing, e.g. in the math attention).
Methods that read AMT's store (AMT, AMT on SimMIM, AutoMAE on the store) are traced with stored
maps and without them (random masking until the first refresh); the larger is kept.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from mimscale import methods

ATTENTION = ("fused", "math")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _FusedSaves(torch.autograd.Function):
    """A fused SDPA kernel as memory sees it: q, k, v [B, H, N, hd] kept as given (views of timm's
    qkv output), the output allocated like q ([B, N, H, hd] in memory, as flash's, so timm's head
    merge after it is a view) and the fp32 logsumexp [B, H, N]. Meta tensors only; never differentiated."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("mimscale.planning's fused-attention stand-in traces memory only; it has no backward")


class _FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention without a mask, dropout or causality -> ``_FusedSaves``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p") and not kwargs.get("is_causal")):
            return _FusedSaves.apply(*args)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Trace:
    """One traced forward, in bytes."""

    saved: int  # distinct non-parameter storages autograd keeps after the forward
    largest: int  # the largest of them (a gradient of its size is in flight in the backward)
    block: int  # the most one transformer block's call (with grad) kept: what a checkpointed block recomputes


@dataclass
class _Kept:
    """One storage autograd saved: its bytes, the Block call that first saved it (0: none), and
    weak references to the tensors saved on it (the storage lives while any of them does)."""

    nbytes: int
    block: int
    refs: list = field(default_factory=list)

    def alive(self) -> bool:
        return any(r() is not None for r in self.refs)


def trace_saved(model: nn.Module, images: torch.Tensor, meta: dict, attention: str = "fused") -> Trace:
    """Run ``model(images, meta)`` (a training forward) and measure what autograd keeps.

    A storage is identified by its StorageImpl (``UntypedStorage._cdata``), which views share on
    the meta device as on real ones. Each storage is attributed to the innermost timm ``Block``
    call that first saved it; a checkpointed block's internals go to torch.utils.checkpoint's own
    hooks (they are not kept) and so are not seen here. ``attention``: see the module docstring;
    ``fused`` replaces SDPA only on the meta device (real devices run their own fused kernels)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r}: allowed values: {', '.join(ATTENTION)}")
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, _Kept] = {}  # StorageImpl address -> the storage saved there last
    stack: list[int] = []  # the Block calls being run, innermost last
    calls = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        # kept detached: a node's own output, kept with its grad_fn, would hold the node that holds
        # it, a cycle through C++ that Python's gc never frees (the graph and its tensors would leak)
        t = t.detach()
        s = t.untyped_storage()
        key = s._cdata
        if key in skip:
            return t
        entry = kept.get(key)
        if entry is None or not entry.alive():  # new, or a freed storage's address taken by another
            kept[key] = entry = _Kept(s.nbytes(), stack[-1] if stack else 0)
        entry.refs.append(weakref.ref(t))
        return t

    def enter(module, args):
        calls[0] += 1
        stack.append(calls[0])

    def leave(module, args, out):
        stack.pop()

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    on_meta = images.device.type == "meta"
    kernel = (_FusedAttention() if on_meta else contextlib.nullcontext()) if attention == "fused" else sdpa_kernel(SDPBackend.MATH)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernel:
            out = model(images, meta)  # held while counting: the graph keeps what the backward needs
        # what a branch the loss does not reach saved has been freed with it: only live storages count
        live = [e for e in kept.values() if e.alive()]
        del out
    finally:
        for h in handles:
            h.remove()
    per_block: dict[int, int] = {}
    for e in live:
        if e.block:
            per_block[e.block] = per_block.get(e.block, 0) + e.nbytes
    return Trace(saved=sum(e.nbytes for e in live), largest=max((e.nbytes for e in live), default=0),
                 block=max(per_block.values(), default=0))


def meta_model(cfg, precision: str = "bf16", grad_ckpt: int | None = None) -> nn.Module:
    """``cfg``'s model on the meta device in training mode, parameters in ``precision`` (DeepSpeed
    casts parameters only: buffers stay fp32), with ``model.grad_ckpt`` = ``grad_ckpt`` if given."""
    if grad_ckpt is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model.grad_ckpt = grad_ckpt
    with torch.device("meta"):
        model = methods.build_model(cfg)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(DTYPES[precision])
    return model.train()


def meta_batch(model: nn.Module, batch: int, store: bool = False) -> tuple[torch.Tensor, dict]:
    """A batch of the loader's shape on the meta device: uint8 images [B, 3, S, S] and box [B, 4],
    flip [B], index [B]; ``store``: AMT's stored maps too, attn [B, L] float16."""
    enc = model.encoder
    images = torch.empty(batch, 3, enc.img_size, enc.img_size, dtype=torch.uint8, device="meta")
    meta = {"box": torch.empty(batch, 4, device="meta"), "flip": torch.empty(batch, dtype=torch.bool, device="meta"),
            "index": torch.empty(batch, dtype=torch.long, device="meta")}
    if store:
        meta["attn"] = torch.empty(batch, enc.num_patches, dtype=torch.float16, device="meta")
    return images, meta


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro step on one GPU, linear in its micro batch B."""

    precision: str
    attention: str
    grad_ckpt: int
    saved_fixed: float  # kept whatever B (about 0: nothing but per-sample tensors is saved)
    saved_per_image: float  # kept for the backward per image: what autograd holds after the forward
    # held on top of that in the backward, per image: gradients in flight (2 x the largest kept
    # tensor) and, with checkpointing, the internals of the one block being recomputed
    transient_per_image: float
    store_phase: bool  # the larger phase was the one with AMT's stored maps (False: random masking)

    def saved(self, batch: int) -> float:
        return self.saved_fixed + self.saved_per_image * batch

    def total(self, batch: int) -> float:
        """Bytes at micro batch ``batch``: saved + transient."""
        return self.saved(batch) + self.transient_per_image * batch


def estimate_activations(cfg, precision: str = "bf16", attention: str = "fused", grad_ckpt: int | None = None) -> ActivationEstimate:
    """The activation estimate of ``cfg``'s method (``grad_ckpt``: None = cfg.model.grad_ckpt)."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: allowed values: {', '.join(DTYPES)}")
    k = cfg.model.grad_ckpt if grad_ckpt is None else grad_ckpt
    model = meta_model(cfg, precision, k)
    # the recomputed block's internals: visible only in a trace without checkpointing
    plain = model if k == 0 else meta_model(cfg, precision, 0)
    best = None
    for store in (False, True) if methods.of(cfg).uses_store(cfg) else (False,):
        two, four = (trace_saved(model, *meta_batch(model, b, store), attention=attention) for b in (2, 4))
        per_image = (four.saved - two.saved) / 2
        largest = (four.largest - two.largest) / 2
        block = 0
        if k > 0:
            p2, p4 = (trace_saved(plain, *meta_batch(plain, b, store), attention=attention) for b in (2, 4))
            block = (p4.block - p2.block) / 2
        est = ActivationEstimate(precision, attention, k, saved_fixed=float(two.saved - 2 * per_image), saved_per_image=float(per_image),
                                 transient_per_image=float(2 * largest + block), store_phase=store)
        if best is None or est.total(1) - est.saved_fixed > best.total(1) - best.saved_fixed:  # per image
            best = est
    return best

"""Activation checkpointing (``model.grad_ckpt``): the same loss and gradients as without it for every
method, really applied (blocks re-run in the backward, fewer saved activations), never in eval or
no_grad passes, and its recomputation FLOPs. The 2-rank ZeRO-1/3 coverage is the golden rerun
(tests/golden/test_golden.py::test_golden_curves_with_grad_ckpt)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mimscale.models.vit as vit
from mimscale import methods
from mimscale.errors import ConfigError
from mimscale.methods.base import block_flops, block_recompute_flops
from mimscale.models.decoder import MAEDecoder
from mimscale.models.registry import ENCODERS, EncoderSpec
from mimscale.models.vit import ViTEncoder, checkpointed, checkpointed_count
from tests.conftest import make_batch, tiny_config, tiny_model

# SimMIM's (and AMT on SimMIM's) unit must tile the tiny 32 px image in more than one unit
UNIT = "masking.simmim.mask_patch_size=8"
CASES = {
    "mae": [],
    "amt": [],  # with attention maps in meta (see _step): AMT's plan with thrown patches
    "automae": [],  # the online extractor: the encoder's CLS-attention mode, then one backward
    "automae_ema": ["masking.automae.extractor=ema"],
    "simmim": [UNIT],
    "amt_simmim": [UNIT],
    "rmae": [],
    "cmae": [],  # two online views, two EMA target views without grad
    "cmae_no_token": ["masking.cmae.mask_token=false"],
    "blockwise": [],
}


def _method(case: str) -> str:
    return case.split("_no_")[0].removesuffix("_ema")


def _step(case: str, k: int, *extra: str):
    """One training forward and backward of the tiny model of ``case`` with model.grad_ckpt = k ->
    (model, loss, detached terms, {parameter name: its gradient})."""
    model = tiny_model(_method(case), *CASES[case], f"model.grad_ckpt={k}", *extra).train()
    images, meta = make_batch(4, box=(0.1, 0.2, 0.9, 0.8), flip=[True, False, True, False])
    if case in ("amt", "amt_simmim"):
        g = torch.Generator().manual_seed(5)
        meta["attn"] = torch.rand(4, model.encoder.num_patches, generator=g).half()  # a refreshed store's maps
    torch.manual_seed(7)  # the draws from the global RNG (masks, Gumbel noise, jitter) repeat between runs
    loss, terms = model(images, meta)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), terms, grads


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 2])
def test_same_loss_and_gradients_with_and_without(case, k):
    _, loss0, terms0, grads0 = _step(case, 0)
    model, loss1, terms1, grads1 = _step(case, k)
    assert model.encoder.grad_ckpt == k and (model.decoder is None or model.decoder.grad_ckpt == k)
    if case.startswith("amt"):
        assert model.last_plan.thrown.shape[1] > 0  # AMT's plan from the maps in meta, not its random warm-up
    assert torch.equal(loss0, loss1), (case, loss0.item(), loss1.item())
    assert terms0.keys() == terms1.keys()
    for key in terms0:
        assert torch.equal(terms0[key], terms1[key]), (case, key)
    assert grads0.keys() == grads1.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unused = {"objective.mask_token"} if case == "cmae_no_token" else set()  # its views drop the masked patches
    assert set(grads0) == trainable - unused  # every trained parameter got a gradient (the target encoders none)
    diffs = {n: (grads0[n] - grads1[n]).abs().max().item() for n in grads0 if not torch.equal(grads0[n], grads1[n])}
    assert not diffs, f"{case}: gradients differ (max abs): {diffs}"


def _count_block_calls(model) -> dict[str, list[int]]:
    """Calls of every encoder / decoder block, per block index. Forward PRE-hooks: a re-run fires them
    too, its (post) forward hooks not, since the early-stopped re-run never returns."""
    calls = {"encoder": [0] * len(model.encoder.blocks), "decoder": [0] * (len(model.decoder.blocks) if model.decoder else 0)}
    for part, counts in calls.items():
        for i, blk in enumerate(getattr(model, part).blocks if counts else []):
            blk.register_forward_pre_hook(lambda *_, i=i, c=counts: c.__setitem__(i, c[i] + 1))
    return calls


@pytest.mark.parametrize("k", [1, 2, 5, 12, 40])
def test_every_kth_block_reruns_in_the_backward(k):
    model = tiny_model("mae", f"model.grad_ckpt={k}", "model.decoder_depth=3").train()
    calls = _count_block_calls(model)
    loss, _ = model(*make_batch())
    fwd = {p: list(c) for p, c in calls.items()}
    assert fwd == {"encoder": [1] * 12, "decoder": [1] * 3}  # the forward: each block once
    loss.backward()
    for part, depth in (("encoder", 12), ("decoder", 3)):
        want = [2 if i % k == 0 else 1 for i in range(depth)]  # blocks 0, k, 2k, ... re-run once
        assert calls[part] == want, (part, k, calls[part])
        assert sum(c - 1 for c in calls[part]) == checkpointed_count(depth, k)


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward of one training forward, as saved-tensor hooks see them: a
    checkpointed block's input [B, N, D] (held by the checkpoint itself, not counted) is all it keeps;
    its internals are recomputed. Tiny MAE, B = 8: 29.0 MB at k = 0, 14.7 MB at k = 2, 1.1 MB at k = 1."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(*batch)
    loss.backward()
    return total


def test_checkpointing_saves_fewer_activations():
    batch = make_batch(8)
    saved = {k: _saved_bytes(tiny_model("mae", f"model.grad_ckpt={k}").train(), batch) for k in (0, 2, 1)}
    # ViT-Tiny's 12 blocks dominate: each keeps ~10 tensors [B, N, D] or wider, checkpointed only its input
    assert saved[1] < saved[2] < saved[0]
    assert saved[1] < 0.25 * saved[0], saved


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts the calls of torch.utils.checkpoint.checkpoint made by vit.run_blocks."""
    calls = []
    real = vit.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(vit, "checkpoint", counting)
    return calls


def test_no_checkpoint_in_eval_or_no_grad(checkpoint_calls):
    model = tiny_model("mae", "model.grad_ckpt=1")
    images, meta = make_batch()
    model.eval()
    model(images, meta)  # eval with grad (CKA's, export checks)
    with torch.no_grad():
        model.train()
        model(images, meta)  # a training-mode pass without a graph
        x = model.normalize(images)
        model.encoder(x, cls_attention=True)  # AMT's refresh: the CLS-attention mode
        model.encoder(x, cls_attention="heads")  # AutoMAE's online extractor
    assert checkpoint_calls == []
    model(images, meta)
    assert checkpoint_calls == [False] * 13  # non-reentrant; 12 encoder blocks + 1 decoder block


def test_only_graph_passes_checkpoint(checkpoint_calls):
    """AutoMAE's extractor (no_grad) and C-MAE's EMA target (no_grad) run their blocks plainly; the
    passes with grad checkpoint every block at k = 1."""
    model = tiny_model("automae", "model.grad_ckpt=1").train()
    model(*make_batch())
    assert len(checkpoint_calls) == 12 + 1  # the reconstruction's encoder and decoder; not the extractor's 11
    checkpoint_calls.clear()
    model = tiny_model("cmae", "model.grad_ckpt=1").train()
    assert model.objective.target_encoder.grad_ckpt == 1  # a copy of the encoder, setting included
    model(*make_batch())
    assert len(checkpoint_calls) == 2 * 12  # two online views; the two target views run without grad
    checkpoint_calls.clear()
    model = tiny_model("rmae", "model.grad_ckpt=3").train()
    model(*make_batch())
    assert len(checkpoint_calls) == 2 * (4 + 1)  # two views: blocks 0, 3, 6, 9 of 12 and the decoder's block 0


def test_cls_attention_maps_and_their_gradients_unchanged():
    torch.manual_seed(0)
    enc0 = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).train()
    enc1 = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8, grad_ckpt=1).train()
    enc1.load_state_dict(enc0.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for mode in ("amt", "heads"):
        with torch.no_grad():
            assert torch.equal(enc0(x, cls_attention=mode), enc1(x, cls_attention=mode))
        outs = []
        for enc in (enc0, enc1):  # with grad (a hypothetical trained extractor): checkpointed blocks, same gradients
            enc.zero_grad()
            a = enc(x, cls_attention=mode)  # [B, L] or [B, H, L]
            (a * torch.linspace(0, 1, a.shape[-1])).sum().backward()
            outs.append((a.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]))
        assert torch.equal(outs[0][0], outs[1][0])
        assert len(outs[0][1]) == len(outs[1][1]) > 0
        assert all(torch.equal(g0, g1) for g0, g1 in zip(outs[0][1], outs[1][1]))


def test_randomness_inside_blocks_replays():
    """A block with dropout / drop path draws the same masks in its re-run (checkpoint restores the RNG
    state), so gradients match the plain run's; the global RNG ends where it would without it."""
    spec = EncoderSpec(dim=32, depth=3, heads=4, patch_size=8)
    outs = []
    for k in (0, 1):
        torch.manual_seed(0)
        enc = ViTEncoder(spec, img_size=32, grad_ckpt=k).train()
        for blk in enc.blocks:
            blk.attn.proj_drop.p = 0.3  # timm's nn.Dropout: inactive (p = 0) in mimscale's blocks
            blk.mlp.drop1.p = 0.3
        x = torch.randn(2, 3, 32, 32)
        torch.manual_seed(1)
        enc(x).square().sum().backward()
        outs.append(([p.grad.clone() for p in enc.parameters()], torch.rand(3)))
    assert all(torch.equal(a, b) for a, b in zip(outs[0][0], outs[1][0]))
    assert torch.equal(outs[0][1], outs[1][1])


def test_config_key_and_constructor_checks():
    assert tiny_config("mae").model.grad_ckpt == 0  # off by default
    assert tiny_config("mae", "model.grad_ckpt=2").model.grad_ckpt == 2
    with pytest.raises(ConfigError, match=r"'model.grad_ckpt' = -1 must be >= 0"):
        tiny_config("mae", "model.grad_ckpt=-1")
    with pytest.raises(ConfigError, match=r"'model.grad_ckpt': expected an integer"):
        tiny_config("mae", "model.grad_ckpt=every")
    with pytest.raises(ValueError, match="grad_ckpt must be an integer >= 0"):
        ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8, grad_ckpt=-2)
    with pytest.raises(ValueError, match="grad_ckpt must be an integer >= 0"):
        MAEDecoder(192, 4, 8, dim=32, depth=1, heads=2, grad_ckpt=1.5)
    assert [i for i in range(12) if checkpointed(i, 5)] == [0, 5, 10] and checkpointed_count(12, 5) == 3
    assert not any(checkpointed(i, 0) for i in range(12)) and checkpointed_count(12, 0) == 0


def _cfg(method: str, *sets: str):
    return tiny_config(method, *({"simmim": [UNIT], "amt_simmim": [UNIT]}.get(method, [])), *sets)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_recompute_flops_every_method(method):
    V, M = 4, 8
    assert methods.recompute_flops(_cfg(method), V, M) == 0.0  # off: nothing recomputed
    every, half = methods.recompute_flops(_cfg(method, "model.grad_ckpt=1"), V, M), methods.recompute_flops(_cfg(method, "model.grad_ckpt=2"), V, M)
    model_flops = methods.flops(_cfg(method, "model.grad_ckpt=1"), V, M)
    assert model_flops == methods.flops(_cfg(method), V, M)  # the model's FLOPs do not change
    # at k = 1 every trained block's forward once more: less than a third of the step (forward + 2 x backward)
    assert 0 < half < every < model_flops / 3
    assert methods.recompute_flops(_cfg(method, "model.grad_ckpt=100"), V, M) < half


def test_recompute_flops_is_the_checkpointed_blocks_forward():
    V, M, D = 4, 8, 192
    dec = block_recompute_flops(1 + V + M, 64)  # the tiny decoder: 64 wide, one block
    enc = block_recompute_flops(1 + V, D)
    assert block_recompute_flops(1 + V, D) == block_flops(1 + V, D) - 2.0 * (1 + V) * 4 * D * D  # all but fc2
    assert methods.recompute_flops(_cfg("mae", "model.grad_ckpt=1"), V, M) == 12 * enc + dec
    assert methods.recompute_flops(_cfg("amt", "model.grad_ckpt=2"), V, M) == 6 * enc + dec
    assert methods.recompute_flops(_cfg("mae", "model.grad_ckpt=5"), V, M) == 3 * enc + dec
    assert methods.recompute_flops(_cfg("simmim", "model.grad_ckpt=1"), V, M) == 12 * block_recompute_flops(1 + V + M, D)
    assert methods.recompute_flops(_cfg("rmae", "model.grad_ckpt=1"), V, M) == 12 * (enc + block_recompute_flops(1 + M, D)) + 2 * dec
    L = V + M
    assert methods.recompute_flops(_cfg("cmae", "model.grad_ckpt=1"), V, M) == 2 * 12 * block_recompute_flops(1 + L, D)
    assert methods.recompute_flops(_cfg("cmae", "model.grad_ckpt=1", "masking.cmae.mask_token=false"), V, M) == 2 * 12 * enc
    # an encoder with its own MLP ratio (ViT-g: 48/11); the decoder keeps MAE's 4
    giant = _cfg("mae", "model.grad_ckpt=4", "model.name=vit_giant")
    assert methods.recompute_flops(giant, V, M) == 10 * block_recompute_flops(1 + V, 1408, 6144 / 1408) + dec


def _backward_flops(case: str, k: int) -> tuple[float, object]:
    """Matmul FLOPs that torch's FLOP counter sees in one backward of ``case`` at model.grad_ckpt = k,
    and the model (its last plan gives the sizes)."""
    model = tiny_model(_method(case), *CASES[case], f"model.grad_ckpt={k}").train()
    torch.manual_seed(7)
    loss, _ = model(*make_batch(4))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops(), model


@pytest.mark.parametrize("case", ["mae", "amt_simmim", "rmae", "cmae"])
@pytest.mark.parametrize("k", [1, 5])
def test_recompute_flops_match_the_measured_recomputation(case, k):
    """The backward's extra work, measured: recompute_flops per image x B, less the attention
    products (4 N^2 D per block pass), which torch's FLOP counter does not count on CPU (fused SDPA)."""
    base, _ = _backward_flops(case, 0)
    ckpt, model = _backward_flops(case, k)
    plan, B = model.last_plan, 4
    V, M = plan.visible.shape[1], plan.masked.shape[1]
    cfg = _cfg(_method(case), f"model.grad_ckpt={k}")
    enc, dec = model.encoder, model.decoder
    tokens = {"mae": ([1 + V], [1 + V + M]), "amt_simmim": ([1 + V + M], []), "rmae": ([1 + V, 1 + M], [1 + V + M] * 2),
              "cmae": ([1 + V + M] * 2, [])}[case]
    attention = checkpointed_count(12, k) * sum(4.0 * n * n * enc.embed_dim for n in tokens[0])
    if dec is not None:
        attention += checkpointed_count(len(dec.blocks), k) * sum(4.0 * n * n * dec.dim for n in tokens[1])
    assert ckpt - base == pytest.approx(B * (methods.recompute_flops(cfg, V, M) - attention), rel=1e-12)

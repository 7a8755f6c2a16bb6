"""Encoder/decoder: position embeddings, token-subset semantics, thrown tokens, gradients."""
import math

import pytest
import torch

from mimscale.masking.base import MaskPlan
from mimscale.masking.random import RandomMasking
from mimscale.models.decoder import MAEDecoder
from mimscale.models.mim import MIMModel
from mimscale.models.registry import ENCODERS, EncoderSpec
from mimscale.models.vit import ViTEncoder, sincos_pos_embed_2d

SPEC = EncoderSpec(dim=32, depth=2, heads=4, patch_size=8)


def small_model(mask_ratio=0.75):
    torch.manual_seed(0)
    enc = ViTEncoder(SPEC, img_size=32)
    dec = MAEDecoder(SPEC.dim, enc.grid, enc.patch_size, dim=16, depth=2, heads=2)
    return MIMModel(enc, dec, RandomMasking(enc.num_patches, mask_ratio))


def test_pos_embed_formula_and_shape():
    dim, grid = 16, 4
    pe = sincos_pos_embed_2d(dim, grid)
    assert pe.shape == (1 + grid * grid, dim)
    assert torch.all(pe[0] == 0)  # CLS row
    # patch (row 2, col 3) is index 2*4+3; first quarter = sin(x * omega), third = sin(y * omega)
    row, col = 2, 3
    v = pe[1 + row * grid + col]
    omega = [1 / 10000 ** (i / 4) for i in range(4)]
    assert torch.allclose(v[:4], torch.tensor([math.sin(col * w) for w in omega]), atol=1e-6)
    assert torch.allclose(v[4:8], torch.tensor([math.cos(col * w) for w in omega]), atol=1e-6)
    assert torch.allclose(v[8:12], torch.tensor([math.sin(row * w) for w in omega]), atol=1e-6)
    assert torch.allclose(v[12:], torch.tensor([math.cos(row * w) for w in omega]), atol=1e-6)
    # every patch position is distinct
    assert torch.cdist(pe[1:], pe[1:]).add(torch.eye(grid * grid)).min() > 1e-3


def test_pos_embed_is_a_fixed_buffer():
    enc = ViTEncoder(SPEC, img_size=32)
    names = [n for n, _ in enc.named_parameters()]
    assert "pos_embed" not in names
    assert enc.pos_embed.shape == (1, 1 + 16, SPEC.dim)


def test_presets_have_paper_sizes():
    assert ENCODERS["vit_base"] == EncoderSpec(768, 12, 12, 16)
    assert ENCODERS["vit_large"] == EncoderSpec(1024, 24, 16, 16)
    assert ENCODERS["vit_huge"] == EncoderSpec(1280, 32, 16, 14)
    assert {"vit_tiny", "vit_small", "vit_2b"} <= set(ENCODERS)


def test_encoder_runs_on_any_subset_and_is_permutation_equivariant():
    torch.manual_seed(1)
    enc = ViTEncoder(SPEC, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    full = enc(x)  # [B, 1 + L, D]
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    out = enc(x, perm)
    assert out.shape == (2, 17, SPEC.dim)
    for b in range(2):
        assert torch.allclose(out[b, 1:], full[b, 1:][perm[b]], atol=1e-5)
        assert torch.allclose(out[b, 0], full[b, 0], atol=1e-5)
    sub = enc(x, perm[:, :5])
    assert sub.shape == (2, 6, SPEC.dim)


def test_decoder_predicts_only_masked_and_ignores_visible_order():
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    plan = MaskPlan.from_order(order, 4, 12)
    latent = model.encoder(x, plan.visible)
    pred = model.decoder(latent, plan)
    assert pred.shape == (2, 12, 8 * 8 * 3)
    # shuffling the visible set (and the latent with it) changes nothing
    sh = torch.tensor([2, 0, 3, 1])
    plan2 = MaskPlan(plan.visible[:, sh], plan.masked, plan.thrown, 16)
    latent2 = torch.cat([latent[:, :1], latent[:, 1:][:, sh]], dim=1)
    assert torch.allclose(model.decoder(latent2, plan2), pred, atol=1e-5)


def test_thrown_tokens_appear_nowhere():
    model = small_model()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    plan = MaskPlan.from_order(order, 3, 7)  # 6 thrown
    lengths = {}
    hook_e = model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: lengths.__setitem__("enc", a[0].shape[1]))
    hook_d = model.decoder.blocks[0].register_forward_pre_hook(lambda m, a: lengths.__setitem__("dec", a[0].shape[1]))
    latent = model.encoder(x, plan.visible)
    pred = model.decoder(latent, plan)
    hook_e.remove(), hook_d.remove()
    assert lengths == {"enc": 1 + 3, "dec": 1 + 3 + 7}
    pred.sum().backward()
    # no gradient reaches the pixels of thrown (or masked) patches
    g = x.grad.abs().reshape(2, 3, 4, 8, 4, 8).sum(dim=(1, 3, 5)).reshape(2, 16)
    for b in range(2):
        assert torch.all(g[b, plan.thrown[b]] == 0)
        assert torch.all(g[b, plan.masked[b]] == 0)
        assert torch.all(g[b, plan.visible[b]] > 0)


def test_every_parameter_gets_a_gradient():
    model = small_model()
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loss, terms = model(imgs, {})
    loss.backward()
    assert set(terms) == {"loss_rec"} and not terms["loss_rec"].requires_grad
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_token_scale_keeps_values_and_passes_gradient():
    model = small_model().eval()
    x = torch.randn(1, 3, 32, 32)
    order = torch.randperm(16)[None]
    plan = MaskPlan.from_order(order, 4, 12)
    s = torch.ones(1, 16, requires_grad=True)
    s_val = s + (1 - s).detach()  # value 1, gradient path to s
    a = model.encoder(x, plan.visible)
    b = model.encoder(x, plan.visible, s_val)
    assert torch.allclose(a, b, atol=1e-6)
    b.sum().backward()
    assert s.grad[0, plan.visible[0]].abs().sum() > 0
    assert torch.all(s.grad[0, plan.masked[0]] == 0)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_base"])
def test_param_counts(name):
    enc = ViTEncoder(ENCODERS[name])
    n = sum(p.numel() for p in enc.parameters())
    expected = {"vit_tiny": 5.5e6, "vit_base": 85.8e6}[name]
    assert abs(n - expected) / expected < 0.02

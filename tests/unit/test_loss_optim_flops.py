"""Loss on known cases, param groups, LR schedule, analytic FLOPs against a hand count."""
import math

import torch

from mimscale.losses import masked_pixel_loss, patchify, unpatchify
from mimscale.metrics import block_flops, mim_flops_per_image
from mimscale.optim import build_scheduler, lr_factor, param_groups
from tests.unit.test_model import small_model


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 8)
    assert p.shape == (2, 4, 192)
    assert torch.equal(unpatchify(p, 8, 2), x)
    # patch 1 is the top-right 8x8 block, pixel (0, 0) channel c at position c
    assert torch.equal(p[0, 1, :3], x[0, :, 0, 8])


def test_loss_known_value_without_norm_pix():
    imgs = torch.full((1, 3, 8, 8), 2.0)  # 4 patches of 4x4
    masked = torch.tensor([[1, 3]])
    pred = torch.zeros(1, 2, 48)
    loss, terms = masked_pixel_loss(pred, imgs, masked, 4, norm_pix=False)
    assert math.isclose(loss.item(), 4.0, rel_tol=1e-6)
    assert not terms["loss_rec"].requires_grad


def test_loss_counts_masked_patches_only_and_norm_pix():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8)
    masked = torch.tensor([[0, 2], [1, 3]])
    target = patchify(imgs, 4).gather(1, masked[..., None].expand(-1, -1, 48))
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    exact = (target - mean) / (var + 1e-6).sqrt()
    loss, _ = masked_pixel_loss(exact, imgs, masked, 4, norm_pix=True)
    assert loss.item() < 1e-10
    # an error of 1 on every pixel of masked patches gives loss 1; visible patches never matter
    loss, _ = masked_pixel_loss(exact + 1, imgs, masked, 4, norm_pix=True)
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-5)


def test_param_groups_no_decay_on_bias_norm_tokens():
    model = small_model()
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert "encoder.cls_token" in no_decay and "decoder.mask_token" in no_decay
    assert all(n.endswith("bias") or "norm" in n or "token" in n for n in no_decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.patch_embed.proj.weight" in decay
    assert all(n.endswith("weight") and "norm" not in n for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_half_cosine():
    w, T = 10, 110
    assert lr_factor(0, w, T) == 0.1
    assert lr_factor(9, w, T) == 1.0
    assert lr_factor(10, w, T) == 1.0
    assert math.isclose(lr_factor(60, w, T), 0.5, abs_tol=1e-12)
    assert math.isclose(lr_factor(110, w, T), 0.0, abs_tol=1e-12)
    assert math.isclose(lr_factor(110, w, T, min_ratio=0.1), 0.1)
    vals = [lr_factor(s, w, T) for s in range(T)]
    assert all(a < b for a, b in zip(vals[:9], vals[1:10]))
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, w, T)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert math.isclose(lrs[0], 0.2) and math.isclose(lrs[9], 2.0) and lrs[11] < 2.0


def test_block_flops_hand_count():
    # N=10 tokens, D=8: qkv 2*10*8*24 + proj 2*10*8*8 + mlp 2*(2*10*8*32) + attn 2*(2*10*10*8)
    hand = 2 * 10 * 8 * 24 + 2 * 10 * 8 * 8 + 2 * 2 * 10 * 8 * 32 + 2 * 2 * 10 * 10 * 8
    assert block_flops(10, 8) == hand


def test_mae_vit_base_flops_match_paper_numbers():
    f = mim_flops_per_image(768, 12, 224, 16, 49, 147, 512, 8)
    assert 57e9 < f < 61e9  # METHODS.md: ~59 GFLOP per training image
    enc_fwd = 12 * block_flops(50, 768)
    assert 4.2e9 < enc_fwd / 2 < 4.4e9  # ~4.3 GMAC
    # throwing shrinks it: r=0.45, t=0.40 keeps 30 visible and 88 masked -> ~36 GFLOP
    assert 34e9 < mim_flops_per_image(768, 12, 224, 16, 30, 88, 512, 8) < 38e9

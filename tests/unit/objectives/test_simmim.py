"""SimMIM and AMT on SimMIM: the loss is the paper's formula, coarse mask units expand to whole
squares of patches, thrown units are absent from the encoder and the loss, and the config keys
that shape the units are checked by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.masking.amt import AMTMasking
from mimscale.masking.base import MaskPlan
from mimscale.masking.coarse import CoarseMasking, unit_patches
from mimscale.masking.noise import SampleNoise
from mimscale.masking.random import RandomMasking
from mimscale.methods.simmim import simmim_flops_per_image
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder
from mimscale.objectives.simmim import SimMIMObjective

# 64 px, patch 8 (an 8 x 8 patch grid), 16-px mask units: a 4 x 4 grid of 2 x 2-patch units
IMG, PATCH, UNIT = 64, 8, 16
G, K = IMG // PATCH, UNIT // PATCH
GU = G // K
TINY = ["model.name=vit_tiny", f"model.img_size={IMG}", f"model.patch_size={PATCH}", f"masking.simmim.mask_patch_size={UNIT}"]


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g)


def _unit_mask(n, masked_units, seed=0):
    """[n, GU, GU] {0, 1}: ``masked_units`` units of each image masked, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, GU * GU, generator=g).argsort(1)
    m = torch.zeros(n, GU * GU)
    m.scatter_(1, order[:, :masked_units], 1.0)
    return m.view(n, GU, GU)


def _plan_from_patch_mask(patch_mask: torch.Tensor) -> MaskPlan:
    """A plan from a {0, 1} [n, G, G] patch mask (no masker involved)."""
    flat = patch_mask.flatten(1).bool()
    n, L = flat.shape
    idx = torch.arange(L).expand(n, -1)
    return MaskPlan(visible=idx[~flat].view(n, -1), masked=idx[flat].view(n, -1),
                    thrown=torch.zeros(n, 0, dtype=torch.long), num_patches=L)


def simmim_reference_loss(enc: ViTEncoder, obj: SimMIMObjective, x: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's forward written as its code does it: every position enters the encoder, masked
    ones as ``x * (1 - w) + mask_token * w``; the head is a 1x1 conv + PixelShuffle over the token
    map; the loss sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / 3 with the per-pixel mask
    upsampled from the mask units."""
    B = x.shape[0]
    patch_mask = unit_mask.repeat_interleave(K, 1).repeat_interleave(K, 2)  # [B, G, G]
    t = enc.patch_embed(x)  # [B, L, D]
    w = patch_mask.flatten(1).unsqueeze(-1)
    t = t * (1 - w) + obj.mask_token.view(1, 1, -1) * w
    t = torch.cat([enc.cls_token.expand(B, -1, -1), t], dim=1) + enc.pos_embed
    for blk in enc.blocks:
        t = blk(t)
    z = enc.norm(t)[:, 1:].transpose(1, 2).reshape(B, -1, G, G)  # [B, D, G, G]
    # the linear head as SimMIM's conv: conv channel c*p*p + i*p + j = linear row (i*p + j)*3 + c
    p = PATCH
    conv = nn.Conv2d(z.shape[1], p * p * 3, kernel_size=1)
    perm = torch.arange(p * p * 3).view(p, p, 3).permute(2, 0, 1).reshape(-1)
    with torch.no_grad():
        conv.weight.copy_(obj.head.weight[perm][:, :, None, None])
        conv.bias.copy_(obj.head.bias[perm])
    x_rec = F.pixel_shuffle(conv(z), p)  # [B, 3, H, W]
    mask = unit_mask.repeat_interleave(UNIT, 1).repeat_interleave(UNIT, 2).unsqueeze(1)  # [B, 1, H, W]
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / 3


def test_loss_equals_simmims_formula_on_a_fixed_batch():
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=IMG, patch_size=PATCH)
    obj = SimMIMObjective(enc)
    x = _images()
    unit_mask = _unit_mask(3, masked_units=10)  # 60% of 16 units, as SimMIM's ratio
    plan = _plan_from_patch_mask(unit_mask.repeat_interleave(K, 1).repeat_interleave(K, 2))
    loss, terms = obj(x, plan)
    ref = simmim_reference_loss(enc, obj, x, unit_mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert terms["loss_rec"] == loss.detach()
    # the loss sees masked pixels only: changing the prediction target at visible patches does nothing
    x2 = x.clone()
    vis = unit_mask.repeat_interleave(UNIT, 1).repeat_interleave(UNIT, 2).unsqueeze(1) == 0
    with torch.no_grad():
        pred, _ = obj.reconstruct(x, plan)
    assert pred.shape == (3, G * G, PATCH * PATCH * 3)  # the head runs on every token
    x2 = torch.where(vis, x2 + 1.0, x2)  # visible pixels change: the encoder input changes, so the loss does
    assert obj(x2, plan)[0].item() != pytest.approx(loss.item(), rel=1e-6)
    # gradients too: the mask token's and the head's equal the reference's
    grads = torch.autograd.grad(loss, [obj.mask_token, obj.head.weight, enc.blocks[0].attn.qkv.weight])
    ref_grads = torch.autograd.grad(simmim_reference_loss(enc, obj, x, unit_mask),
                                    [obj.mask_token, enc.blocks[0].attn.qkv.weight])
    assert torch.allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[2], ref_grads[1], rtol=1e-4, atol=1e-7)


def test_unit_table_lists_each_units_square_of_patches():
    assert unit_patches(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert unit_patches(6, 3)[3].tolist() == [21, 22, 23, 27, 28, 29, 33, 34, 35]
    with pytest.raises(ValueError, match="tile"):
        unit_patches(8, 3)


def _check_units(plan: MaskPlan, sizes_in_units: tuple[int, int, int]):
    """Every set is made of whole units (each unit's K*K patches, all in one set), the three sets
    are disjoint and cover the patch grid, and the counts are the unit counts x K*K."""
    B = plan.batch_size
    n = K * K
    for ids, units in zip((plan.visible, plan.masked, plan.thrown), sizes_in_units):
        assert ids.shape == (B, units * n)
        unit_of = (ids // G // K) * GU + (ids % G) // K  # [B, units * n]
        blocks = unit_of.view(B, units, n)
        assert torch.all(blocks == blocks[:, :, :1])  # a unit's patches are listed together
    every = torch.cat([plan.visible, plan.masked, plan.thrown], 1).sort(1).values
    assert torch.equal(every, torch.arange(G * G).expand(B, -1))


def test_coarse_random_masking_expands_units_disjoint_complete_and_at_the_ratio():
    m = CoarseMasking(RandomMasking(GU * GU, 0.6), G, K)
    assert m.num_patches == G * G and m.initial_sizes() == (6 * 4, 10 * 4, 0)  # round(0.6 x 16) = 10 units masked
    torch.manual_seed(0)
    plan = m(torch.zeros(32, 3, IMG, IMG), {})
    _check_units(plan, (6, 10, 0))
    assert plan.fractions()["masked"] == pytest.approx(10 / 16)
    # every unit is masked about 10/16 of the time (the inner random masking is uniform over units)
    hits = torch.zeros(GU * GU)
    for _ in range(20):
        p = m(torch.zeros(32, 3, IMG, IMG), {})
        hits += torch.bincount(((p.masked // G // K) * GU + (p.masked % G) // K).flatten(), minlength=GU * GU) / (K * K)
    assert torch.all((hits / 640 - 10 / 16).abs() < 0.1)


def test_coarse_amt_masking_throws_whole_units_and_weights_follow_the_map():
    amt = AMTMasking(GU * GU, 0.44, 0.26, warmup_ratio=0.6)
    m = CoarseMasking(amt, G, K)
    B = 8
    maps = torch.full((B, G * G), 0.01)
    hot = unit_patches(G, K)[5]  # the patches of unit 5 (row 1, column 1 of the unit grid)
    maps[:, hot] = 1.0
    meta = {"attn": maps.half(), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(B, 1),
            "flip": torch.zeros(B, dtype=torch.bool), "index": torch.arange(B)}
    torch.manual_seed(0)
    plan = m(torch.zeros(B, 3, IMG, IMG), meta)
    _check_units(plan, (5, 7, 4))  # 16 units: round(7.04) masked, round(4.16) thrown, 5 visible
    w = m.last_weights  # [B, L] per patch, each unit's weight on its patches
    assert w.shape == (B, G * G)
    table = unit_patches(G, K)
    assert torch.all(w[:, table] == w[:, table[:, :1]])
    assert torch.all(w[:, table[5, 0]] == w.max(1).values)  # the hot unit carries the largest weight
    # the hot unit (weight ~100x the others) is masked first in nearly every sample
    assert (plan.masked[:, :K * K] == table[5]).all(1).float().mean() >= 0.75
    # before the first refresh (no maps): SimMIM's random unit masking at the warm-up ratio
    plan0 = m(torch.zeros(B, 3, IMG, IMG), {k: v for k, v in meta.items() if k != "attn"})
    _check_units(plan0, (6, 10, 0))
    assert m.last_weights is None


def _amt_simmim(B=4):
    cfg = load_config(None, TINY + [methods.select("amt_simmim"), "masking.amt.mask_ratio=0.44", "masking.amt.throw_ratio=0.26"])
    torch.manual_seed(0)
    model = methods.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (B, 3, IMG, IMG), dtype=torch.uint8, generator=g)

    def meta():  # keyed noise, fresh per call: the same plan every forward
        return {"attn": torch.rand(B, G * G, generator=torch.Generator().manual_seed(2)).half(),
                "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(B, 1), "flip": torch.zeros(B, dtype=torch.bool),
                "index": torch.arange(B), "noise": SampleNoise(seed=3, step=0, offset=0, global_batch=B)}
    return cfg, model, images, meta


def _loss_and_grads(model, images, meta):
    model.zero_grad(set_to_none=True)
    loss, _ = model(images, meta)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_amt_simmims_thrown_patches_are_in_neither_encoder_nor_loss():
    cfg, model, images, meta = _amt_simmim()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    loss, grads = _loss_and_grads(model, images, meta())
    plan = model.last_plan
    V, M, T = plan.visible.shape[1], plan.masked.shape[1], plan.thrown.shape[1]
    assert (V, M, T) == (5 * 4, 7 * 4, 4 * 4)
    assert seen == [(4, 1 + V + M, model.encoder.embed_dim)]  # CLS + visible + mask tokens; no thrown token
    # new pixels in the thrown patches: the same plan, the same loss and the same gradients, bit for bit
    thrown_px = torch.zeros(4, G * G, dtype=torch.bool)
    thrown_px.scatter_(1, plan.thrown, True)
    thrown_px = thrown_px.view(4, 1, G, G).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    other = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    loss2, grads2 = _loss_and_grads(model, torch.where(thrown_px, other, images), meta())
    assert torch.equal(model.last_plan.thrown, plan.thrown)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)
    # the same change in masked patches moves the loss (they are the target)
    masked_px = torch.zeros(4, G * G, dtype=torch.bool)
    masked_px.scatter_(1, plan.masked, True)
    masked_px = masked_px.view(4, 1, G, G).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    loss3, _ = _loss_and_grads(model, torch.where(masked_px, other, images), meta())
    assert not torch.equal(loss, loss3)
    assert model.decoder is None and "objective.head.weight" in grads and "objective.mask_token" in grads


def test_flops_count_the_encoder_on_kept_tokens_and_the_linear_head():
    cfg = load_config(None, [methods.select("simmim"), "masking.mask_ratio=0.6"])  # ViT-B/16 at 224, 32-px units
    model_v, model_m = 20 * 4, 29 * 4  # 49 units: round(29.4) masked
    f = methods.flops(cfg, model_v, model_m)
    assert f == simmim_flops_per_image(enc_dim=768, enc_depth=12, img_size=224, patch=16, visible=model_v, masked=model_m)
    # the encoder on all 197 tokens + a 768 -> 768 head on 196, forward + backward: a ViT-B step
    enc = 2.0 * 196 * 768 * 768 + 12 * (2.0 * 197 * 768 * 768 * 12 + 4.0 * 197 * 197 * 768)
    assert f == pytest.approx(3 * (enc + 2.0 * 196 * 768 * 768))
    amt = load_config(None, [methods.select("amt_simmim"), "masking.mask_ratio=0.6", "masking.amt.mask_ratio=0.44",
                             "masking.amt.throw_ratio=0.26"])
    fa = methods.flops(amt, 14 * 4, 22 * 4)  # 13 of 49 units thrown
    assert 0.70 < fa / f < 0.76  # the AMT paper: ~0.76x SimMIM's pre-training cost at t = 0.26


@pytest.mark.parametrize("sets, needle", [
    (["masking.simmim.mask_patch_size=12"], "'masking.simmim.mask_patch_size' = 12 must be a multiple of the patch size 8"),
    (["masking.simmim.mask_patch_size=24"], "'masking.simmim.mask_patch_size' = 24 must be a multiple of the patch size 8 and divide"),
    (["masking.simmim.mask_patch_size=0"], "'masking.simmim.mask_patch_size' = 0 must be > 0"),
    (["masking.simmim.mask_patch_size=64"], "'masking.mask_ratio' = 0.75 and 'masking.simmim.mask_patch_size' = 64"),
])
def test_simmim_config_errors_name_the_key(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, TINY + [methods.select("simmim"), *sets])


def test_amt_simmim_ratios_are_checked_on_the_unit_grid():
    # 32 px in 16-px units: 4 units; AMT's MAE defaults (0.45 + 0.40) leave none visible
    with pytest.raises(ConfigError, match="'masking.amt.mask_ratio' \\+ 'masking.amt.throw_ratio' = 0.45 \\+ 0.4 and "
                                          "'masking.simmim.mask_patch_size' = 16: AMT's plan over 4 units"):
        load_config(None, TINY + ["model.img_size=32", methods.select("amt_simmim")])
    load_config(None, TINY + ["model.img_size=32", methods.select("amt_simmim"), "masking.mask_ratio=0.5",
                              "masking.amt.mask_ratio=0.5", "masking.amt.throw_ratio=0.25"])


def test_other_methods_ignore_the_unit_size():
    cfg = load_config(None, TINY + ["masking.simmim.mask_patch_size=12", methods.select("mae")])
    assert cfg.masking.simmim.mask_patch_size == 12


def test_presets_are_the_papers_recipes():
    configs = Path(__file__).resolve().parents[3] / "mimscale" / "configs"
    s = load_config(configs / "simmim_vit_base.yaml")
    assert (s.masking.method, s.masking.mask_ratio, s.masking.simmim.mask_patch_size) == ("simmim", 0.6, 32)
    assert (s.train.epochs, s.train.warmup_epochs, s.train.beta2, s.train.weight_decay) == (800, 10, 0.999, 0.05)
    assert s.train.base_lr * s.train.global_batch / 256 == pytest.approx(1e-4 * s.train.global_batch / 512)  # SimMIM's per-512 rule
    a = load_config(configs / "amt_simmim_vit_base.yaml")
    assert (a.masking.method, a.masking.amt.mask_ratio, a.masking.amt.throw_ratio, a.train.epochs) == ("amt_simmim", 0.44, 0.26, 200)
    assert (a.masking.amt.first_refresh, a.masking.amt.refresh_every) == ("40", "40")

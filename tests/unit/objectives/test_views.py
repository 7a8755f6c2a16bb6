"""R-MAE and C-MAE (single process; the 2-rank ZeRO versions are in tests/integration/test_views.py)."""
from __future__ import annotations

import pytest
import torch

from mimscale import methods
from mimscale.errors import ConfigError
from mimscale.hooks.ema import EMAHooks
from mimscale.masking.base import MaskPlan
from mimscale.models.losses import masked_pixel_loss
from mimscale.objectives.color import color_jitter
from mimscale.objectives.rmae import RMAEObjective
from mimscale.optim import param_groups
from tests.conftest import tiny_config, tiny_model


def _record_encoder_calls(model):
    calls = []
    model.encoder.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls


def test_rmae_views_are_exact_complements(tiny_batch):
    model = tiny_model("rmae")
    calls = _record_encoder_calls(model)
    model(*tiny_batch)
    plan = model.last_plan
    assert len(calls) == 2
    first, second = calls[0][0][1], calls[1][0][1]  # the `visible` argument of each encoder call
    assert torch.equal(first, plan.visible) and torch.equal(second, plan.masked)
    both = torch.cat([first, second], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(16).expand(4, 16))  # disjoint and covering every patch
    assert plan.thrown.shape[1] == 0 and plan.masked.shape[1] == 12  # masking.mask_ratio 0.75: T2 is 3/4
    comp = RMAEObjective.complement(plan)
    assert torch.equal(comp.visible, plan.masked) and torch.equal(comp.masked, plan.visible)


def test_rmae_loss_is_distance_plus_autoencoding(tiny_batch):
    model = tiny_model("rmae", "masking.rmae.lam=0.5")
    torch.manual_seed(3)
    images, meta = tiny_batch
    loss, terms = model(images, meta)
    plan, x = model.last_plan, model.normalize(images)
    enc, dec = model.encoder, model.decoder
    pred_12 = dec(enc(x, plan.visible), plan)
    second = MaskPlan(visible=plan.masked, masked=plan.visible, thrown=plan.thrown, num_patches=16)
    masked_out, visible_out = dec(enc(x, plan.masked), second, with_visible=True)
    torch.testing.assert_close(masked_out, dec(enc(x, plan.masked), second))  # the extra outputs change nothing
    # the visible outputs follow the visible tokens: permuting them permutes the outputs alike
    perm = torch.randperm(second.visible.shape[1])
    shuffled = MaskPlan(visible=second.visible[:, perm], masked=second.masked, thrown=second.thrown, num_patches=16)
    _, visible_perm = dec(enc(x, shuffled.visible), shuffled, with_visible=True)
    torch.testing.assert_close(visible_perm, visible_out[:, perm], atol=1e-5, rtol=1e-4)
    dist = (pred_12 - visible_out).pow(2).mean()
    auto, _ = masked_pixel_loss(visible_out, x, plan.masked, 8, True)
    torch.testing.assert_close(terms["loss_dist"], dist.detach())
    torch.testing.assert_close(terms["loss_ae"], auto.detach())
    torch.testing.assert_close(loss, dist + 0.5 * auto)


def test_cmae_target_gets_no_gradient_and_follows_the_ema(tiny_batch):
    model = tiny_model("cmae")
    obj = model.objective
    assert model.decoder is None  # no pixel decoder: nothing without a gradient in the engine
    loss, terms = model(*tiny_batch)
    loss.backward()
    target = [(n, p) for n, p in model.named_parameters() if n.startswith("objective.target_")]
    assert len(target) > 50
    assert all(not p.requires_grad and p.grad is None for _, p in target)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert obj.mask_token.grad.abs().sum() > 0
    grouped = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not any(id(p) in grouped for _, p in target)  # the optimizer never sees the target
    # the EMA hook: target <- 0.9 target + 0.1 online
    before = [t.detach().clone() for _, t in obj.ema_pairs()]
    with torch.no_grad():
        for p, _ in obj.ema_pairs():
            p.add_(1.0)
    EMAHooks(obj.ema_pairs(), 0.9).after_optimizer_step()
    for (p, t), b in zip(obj.ema_pairs(), before):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * p)


def test_cmae_views_hide_complementary_patches_with_the_mask_token(tiny_batch):
    model = tiny_model("cmae", "masking.cmae.color_jitter=false", "masking.cmae.views=complementary")
    calls = _record_encoder_calls(model)
    target_calls = []
    model.objective.target_encoder.register_forward_pre_hook(lambda m, a, kw: target_calls.append(kw), with_kwargs=True)
    model(*tiny_batch)
    plan = model.last_plan
    hidden = [kw["hidden"] for _, kw in calls] + [kw["hidden"] for kw in target_calls]
    assert len(hidden) == 4  # two online views, two target views
    assert torch.equal(hidden[0], plan.masked) and torch.equal(hidden[1], plan.visible)
    assert torch.equal(hidden[2], plan.masked) and torch.equal(hidden[3], plan.visible)
    # the mask-token mode replaces exactly the hidden patches' tokens
    enc, x = model.encoder, model.normalize(tiny_batch[0])
    tok = torch.randn(enc.embed_dim)
    full = enc.patch_embed(x)
    idx = torch.tensor([[0, 5], [1, 2], [3, 15], [7, 8]])
    want = full.clone()
    for b in range(4):
        want[b, idx[b]] = tok
    got = enc(x, hidden=idx, mask_token=tok)
    ref = enc.norm(_blocks(enc, want))
    torch.testing.assert_close(got, ref)


def _blocks(enc, tokens):
    x = tokens + enc.pos_embed[:, 1:]
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    return x


def test_color_jitter_per_sample_and_identity_when_off():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    torch.testing.assert_close(color_jitter(x, p_jitter=0.0, p_gray=0.0), x)
    torch.testing.assert_close(color_jitter(x, strength=0.0, hue=0.0, p_jitter=1.0, p_gray=0.0), x, atol=1e-5, rtol=0)
    y = color_jitter(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    ratio = (y.mean((1, 2, 3)) / x.mean((1, 2, 3)))
    assert ratio.std() > 0.02  # factors differ per sample
    gray = color_jitter(x, p_jitter=0.0, p_gray=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_view_methods_flops_and_config_errors():
    rmae, mae = tiny_config("rmae"), tiny_config("mae")
    assert methods.flops(rmae, 4, 12) > 2 * methods.flops(mae, 4, 12)
    assert methods.flops(tiny_config("cmae"), 4, 12) > 0
    for key, bad in (("masking.rmae.lam", "-1"), ("masking.cmae.temperature", "0"), ("masking.cmae.momentum", "1.0"),
                     ("masking.cmae.proj_dim", "0")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config(None, f"{key}={bad}")
    with pytest.raises(ConfigError, match="rmae, cmae"):
        tiny_config(None, "masking.method=simclr")

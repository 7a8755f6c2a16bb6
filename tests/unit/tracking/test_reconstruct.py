"""tracking/reconstruct.py: the mask grid's reconstruction is the model's own prediction, mapped
back to pixels in each family's target space, and drawing it changes nothing about training."""
from __future__ import annotations

import pytest
import torch

from mimscale.models.losses import patchify
from mimscale.models.vit import gather_tokens
from mimscale.tracking.reconstruct import plan_rows, reconstruct, to_pixels
from tests.conftest import make_batch, tiny_model

SIMMIM = ("masking.simmim.mask_patch_size=8",)  # 4 x 4 units of the tiny 32 px model
THROWING = {"amt": ("masking.mask_ratio=0.5", "masking.amt.throw_ratio=0.25"), "amt_simmim": SIMMIM}


def _trained_step(method: str, *sets: str):
    """A tiny model, a batch and the loss and plan of its training forward (AMT with attention maps:
    it throws). Pixels in 96..159 and the pixel head scaled down, so the untrained model's
    predictions stay inside 0..255 (the grid clamps there) and the comparisons see them unclamped."""
    model = tiny_model(method, *sets)
    head = model.decoder.pred if model.decoder is not None else getattr(model.objective, "head", None)
    if head is not None:
        with torch.no_grad():
            head.weight.mul_(0.2)
    images, meta = make_batch(4)
    images = 96 + images // 4
    meta["attn"] = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)).half()
    loss, _ = model(images, meta)
    return model, images, loss.detach(), model.last_plan


def _targets(model, images, idx: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """The loss's targets at patch indices idx [B, K]: [B, K, p*p*3]."""
    t = gather_tokens(patchify(model.normalize(images), model.patch_size), idx)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    return t


def _pred_space(model, rec, images, idx, norm_pix):
    """The reconstruction's pixels taken back into the loss's target space at idx."""
    x = model.normalize(images)
    pix = gather_tokens(patchify(model.normalize(rec.pixels), model.patch_size), idx)
    if not norm_pix:
        return pix
    own = gather_tokens(patchify(x, model.patch_size), idx)
    return (pix - own.mean(-1, keepdim=True)) / (own.var(-1, keepdim=True) + 1e-6).sqrt()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_predictions_give_back_the_image(norm_pix):
    model = tiny_model("mae")
    images, _ = make_batch(2)
    L = model.encoder.num_patches
    idx = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(i)) for i in range(2)])[:, :10]
    rec = to_pixels(_targets(model, images, idx, norm_pix), idx, model.normalize(images), model.patch_size, norm_pix, model)
    assert rec.predicted.sum().item() == 20 and rec.predicted.gather(1, idx).all()
    grid = model.encoder.grid
    mask = rec.predicted.view(2, 1, grid, 1, grid, 1).expand(2, 3, grid, 8, grid, 8).reshape(images.shape)
    assert torch.allclose(rec.pixels[mask], images.float()[mask], atol=1e-3)


@pytest.mark.parametrize("method,sets,norm_pix", [("mae", (), True), ("mae", ("model.norm_pix_loss=false",), False),
                                                  ("amt", THROWING["amt"], True), ("rmae", (), True)])
def test_mae_path_prediction_is_the_training_forwards(method, sets, norm_pix):
    """The loss recomputed from the grid's pixels at the masked patches is the training forward's
    reconstruction loss: the same prediction, un-normalized with the patch's own statistics."""
    model, images, loss, plan = _trained_step(method, *sets)
    rec = reconstruct(model, images, plan)
    assert 0 < rec.pixels.min() and rec.pixels.max() < 255
    pred = _pred_space(model, rec, images, plan.masked, norm_pix)
    mse = (pred - _targets(model, images, plan.masked, norm_pix)).pow(2).mean()
    if method == "rmae":  # its loss is a view distance plus lam x this auto-encoding of view T1's decoder
        dec, enc = model.decoder, model.encoder
        ref = dec(enc(model.normalize(images), plan.visible), plan)
        loss = (ref.float() - _targets(model, images, plan.masked, norm_pix)).pow(2).mean()
    assert mse.item() == pytest.approx(loss.item(), rel=1e-4)
    # predicted: visible and masked patches, never thrown ones
    want = torch.zeros(4, plan.num_patches, dtype=torch.bool)
    want.scatter_(1, torch.cat([plan.visible, plan.masked], 1), True)
    assert torch.equal(rec.predicted, want)
    assert plan.thrown.shape[1] == (4 if method == "amt" else 0)


@pytest.mark.parametrize("method", ["simmim", "amt_simmim"])
def test_simmim_prediction_is_the_training_forwards(method):
    """SimMIM's L1 on masked pixels of the normalized image, from the grid's pixels (no per-patch statistics)."""
    model, images, loss, plan = _trained_step(method, *THROWING.get(method, SIMMIM))
    rec = reconstruct(model, images, plan)
    pred = _pred_space(model, rec, images, plan.masked, False)
    l1 = (pred - _targets(model, images, plan.masked, False)).abs().sum() / (plan.masked.numel() * 64 + 1e-5) / 3
    assert l1.item() == pytest.approx(loss.item(), rel=1e-4)
    assert rec.predicted.sum(1).tolist() == [plan.visible.shape[1] + plan.masked.shape[1]] * 4
    if method == "amt_simmim":
        assert plan.thrown.shape[1] > 0 and not rec.predicted.gather(1, plan.thrown).any()


def test_cmae_has_no_pixel_prediction():
    model, images, _, plan = _trained_step("cmae")
    assert reconstruct(model, images, plan) is None


def test_reconstruction_leaves_modes_rng_and_gradients_alone():
    model, images, _, plan = _trained_step("mae")
    model.train()
    model.decoder.blocks[0].eval()  # a part kept in eval mode stays there
    rng = torch.random.get_rng_state()
    rec = reconstruct(model, images[:2], plan_rows(plan, 2))
    assert rec.pixels.shape == (2, 3, 32, 32) and rec.pixels.min() >= 0 and rec.pixels.max() <= 255
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and model.encoder.training and not model.decoder.blocks[0].training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="a plan for 4 images given with 2 images"):
        reconstruct(model, images[:2], plan)

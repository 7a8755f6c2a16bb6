"""mimscale/losses.py: patchify and the masked pixel loss on known cases."""
import math

import torch

from mimscale.models.losses import masked_pixel_loss, patchify, unpatchify


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

"""Pixel reconstruction loss. Every loss returns (total, dict of detached terms)."""
from __future__ import annotations

import torch

from mimscale.models.vit import gather_tokens


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """images [B, C, H, W] -> patches [B, L, p*p*C], row-major patches, (py, px, c) inside a patch."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    """Inverse of patchify for square images: [B, L, p*p*3] -> [B, 3, grid*p, grid*p]."""
    B = patches.shape[0]
    x = patches.reshape(B, grid, grid, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, 3, grid * p, grid * p)


def masked_pixel_loss(
    pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, p: int, norm_pix: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between predictions and (per-patch normalized) pixels, on masked patches only.

    pred [B, M, p*p*3] for patch indices masked [B, M]; images [B, 3, H, W] (normalized).
    Each patch's squared error is averaged over its pixels, then over the B*M masked patches.
    Computed in fp32 whatever the model's precision.
    """
    target = gather_tokens(patchify(images.float(), p), masked)  # [B, M, P]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
        target = (target - mean) / (var + 1e-6).sqrt()
    loss = (pred.float() - target).pow(2).mean()
    return loss, {"loss_rec": loss.detach()}

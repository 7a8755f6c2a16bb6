"""SimMIM (Xie et al., CVPR 2022): mask tokens in the encoder, a linear head, L1 on masked pixels.

    tokens  patch embedding of every kept patch (plan.visible + plan.masked); at masked positions
            the embedding is replaced by one learned mask token [D], then the position embedding
            is added (SimMIM: ``x * (1 - w) + mask_token * w`` before ``+ pos_embed``)
    encoder the ViT on [CLS] + V + M tokens; thrown patches (AMT) are not in its input at all
    head    one nn.Linear(D, p*p*3) per token: SimMIM's ViT head (a 1x1 conv to p*p*3 channels,
            then PixelShuffle(p)) is this linear with its outputs laid out as pixels. It runs on
            every encoder output token, as SimMIM's; only masked ones reach the loss
    loss    L1 between the reconstruction and the *normalized image* (no per-patch normalization),
            on masked pixels only, as SimMIM's code:
                sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / 3
            where ``mask`` is the per-pixel [B, 1, H, W] mask (one per location, hence / 3 channels).

Predictions are in ``mimscale.models.losses.patchify``'s layout ((row, col, channel) inside a patch); the
head's rows are a permutation of SimMIM's conv channels, so the two parametrize the same functions.
``model.norm_pix_loss`` is not read: SimMIM's target is the normalized image itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimscale.masking.base import MaskPlan
from mimscale.models.losses import patchify
from mimscale.models.vit import gather_tokens


class SimMIMObjective(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        object.__setattr__(self, "_encoder", encoder)  # MIMModel's, registered (and partitioned) there
        D, p = encoder.embed_dim, encoder.patch_size
        self.mask_token = nn.Parameter(torch.zeros(D))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # SimMIM's init
        # PyTorch's default init, as SimMIM's 1x1 conv head (same fan-in, same bounds)
        self.head = nn.Linear(D, p * p * 3)

    def reconstruct(self, x: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] normalized -> (pred [B, V + M, p*p*3], kept [B, V + M] patch indices):
        the head's output for every token the encoder saw, visible ones first, then masked."""
        enc = self._encoder
        kept = torch.cat([plan.visible, plan.masked], dim=1)  # [B, V + M]; thrown ones are absent
        z = enc(x.to(enc.patch_embed.proj.weight.dtype), kept, plan.token_scale, hidden=plan.masked,
                mask_token=self.mask_token)  # [B, 1 + V + M, D]
        return self.head(z[:, 1:]), kept

    def forward(self, x: torch.Tensor, plan: MaskPlan, meta: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] normalized fp32; plan: visible, masked and thrown patch indices. Returns
        (loss, {"loss_rec": detached loss}); ``meta`` is not needed by SimMIM."""
        pred, _ = self.reconstruct(x, plan)
        V, M = plan.visible.shape[1], plan.masked.shape[1]
        p = self._encoder.patch_size
        target = gather_tokens(patchify(x.float(), p), plan.masked)  # [B, M, p*p*3]
        err = (pred[:, V:].float() - target).abs().sum()
        masked_pixels = plan.masked.shape[0] * M * p * p  # sum(mask) of the per-pixel [B, 1, H, W] mask
        loss = err / (masked_pixels + 1e-5) / 3
        return loss, {"loss_rec": loss.detach()}

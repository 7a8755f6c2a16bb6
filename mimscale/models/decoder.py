"""MAE decoder: visible tokens and [MASK] tokens placed by index; predicts masked patches only.

Attention is permutation-equivariant once position embeddings are added, so instead of
un-shuffling a full L-long sequence (MAE's reference code) the decoder runs on
[CLS, visible..., masked...] with each token's own position embedding. Thrown patches are simply
absent: the sequence is 1 + V + M long, and only the M masked outputs go through the pixel head.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimscale.masking.base import MaskPlan
from mimscale.models.vit import check_grad_ckpt, gather_tokens, init_mae_weights, run_blocks, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, grid: int, patch_size: int, dim: int = 512, depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0,
                 grad_ckpt: int = 0):
        super().__init__()
        self.dim = dim
        self.grad_ckpt = check_grad_ckpt(grad_ckpt)  # model.grad_ckpt, as the encoder's (vit.run_blocks)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, plan: MaskPlan, with_visible: bool = False):
        """latent [B, 1 + V, De] (encoder output for plan.visible) -> predictions [B, M, p*p*3]
        for the patches in plan.masked, in that order. ``with_visible``: also the predictions at
        the visible tokens' own positions [B, V, p*p*3] (R-MAE's auto-encoding term), as a pair
        (masked, visible)."""
        x = self.embed(latent)  # [B, 1 + V, D]
        B, M = plan.masked.shape
        pos = self.pos_embed.to(x.dtype).expand(B, -1, -1)  # [B, 1 + L, D]
        pos_patches = pos[:, 1:]
        cls = x[:, :1] + pos[:, :1]
        vis = x[:, 1:] + gather_tokens(pos_patches, plan.visible)
        msk = self.mask_token.to(x.dtype).expand(B, M, -1) + gather_tokens(pos_patches, plan.masked)
        x = torch.cat([cls, vis, msk], dim=1)  # [B, 1 + V + M, D]
        x = run_blocks(self.blocks, x, self.grad_ckpt, self.training)  # [B, 1 + V + M, D]
        if with_visible:
            out = self.pred(self.norm(x[:, 1:]))  # [B, V + M, P]
            return out[:, -M:], out[:, :-M]
        x = self.norm(x[:, -M:])
        return self.pred(x)

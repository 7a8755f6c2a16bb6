"""AutoMAE masker (Chen et al. 2023): a Gumbel-softmax mask generator trained adversarially
against a discriminator and jointly with the MAE, in the same step, loss and backward.

Per batch, on the device (shapes for B images, H heads, a g x g patch grid, L = g*g):
  1. maps [B, C, g, g], no grad, from the extractor (C = its heads, or 1 for ``stored``): per head
     the raw softmax of the last block's CLS query over the patch keys (rows sum to 1; the paper's
     input), or each head min-max stretched (``attention='stretched'``):
       online  the encoder being trained, on the same crop (CLS-attention mode of ViTEncoder)
       ema     an EMA copy of that encoder (a submodule: partitioned and gathered like the rest)
       frozen  any pretrained timm ViT (masking/extractor.py; DINO-S for a ViT-B, as the paper's best)
       stored  AMT's attention store (whole-image maps refreshed on AMT's schedule), aligned
               with the crop: almost no extra compute
  2. m = gumbel_softmax(G(maps)) [B, L], rows summing to 1; pseudo "real" masks [B, L].
  3. ONE discriminator call on [real, sg(m), m] -> LSGAN terms routed so that D learns only from
     L_D and G only from lambda L_G (see automae_parts.lsgan_terms).
  4. b_st = straight-through top-K(m), K = visible count; s = U(0,1) + 0.5 b_st; in descending
     order of s: masked, then thrown (``throw_ratio``), then visible. The embedded tokens
     (position included, as the paper) are scaled by s + sg(1 - s) (value 1, gradient x), so the
     reconstruction loss trains G as well.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mimscale.masking import noise as sample_noise
from mimscale.masking.amt_ops import align_maps
from mimscale.masking.automae_parts import Discriminator, MaskGenerator, gumbel_mask, lsgan_terms, pseudo_masks, straight_through_topk
from mimscale.masking.base import Masker, MaskPlan, plan_sizes
from mimscale.masking.extractor import ATTENTION, FrozenExtractor
from mimscale.models.partitioned import frozen_copy

EXTRACTORS = ("online", "ema", "frozen", "stored")


class AutoMAEMasking(Masker):
    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, throw_ratio: float = 0.0, lam: float = 0.2,
                 extractor: str = "online", frozen: Optional[FrozenExtractor] = None, attention: str = "raw",
                 make_encoder: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ValueError(f"masking.automae.extractor {extractor!r}: allowed values: {', '.join(EXTRACTORS)}")
        if attention not in ATTENTION:
            raise ValueError(f"masking.automae.attention {attention!r}: allowed values: {', '.join(ATTENTION)}")
        self.num_patches = encoder.num_patches
        self.grid = encoder.grid
        self.num_visible, self.num_masked, self.num_thrown = plan_sizes(self.num_patches, mask_ratio, throw_ratio)
        self.lam = lam
        self.extractor = extractor
        self.attention_mode = ATTENTION[attention]
        if extractor == "frozen":
            if frozen is None:
                raise ValueError("masking.automae.extractor=frozen needs masking.automae.extractor_checkpoint")
            self.frozen = frozen  # a frozen submodule (masking/extractor.py)
        heads = {"stored": 1, "frozen": frozen.heads if frozen is not None else 0}.get(extractor, encoder.spec.heads)
        self.generator = MaskGenerator(heads)
        self.discriminator = Discriminator(self.grid)
        # Not a submodule: the online extractor is the model's own encoder (registered once, in MIMModel).
        object.__setattr__(self, "_online", encoder)
        if extractor == "ema":
            self.ema = frozen_copy(encoder, make_encoder)  # under zero.Init: a partitioned twin
        self.last_weights: Optional[torch.Tensor] = None  # m of the last batch [B, L] (for the mask grid)

    def initial_sizes(self) -> tuple[int, int, int]:
        return self.num_visible, self.num_masked, self.num_thrown

    @torch.no_grad()
    def extract(self, images: torch.Tensor, meta: dict) -> torch.Tensor:
        """images [B, 3, S, S] normalized -> maps [B, C, g, g] float32."""
        B, g = images.shape[0], self.grid
        if self.extractor == "stored":
            stored = meta.get("attn")  # [B, L] whole-image maps; absent before the first refresh
            if stored is None:
                return torch.zeros(B, 1, g, g, device=images.device)
            sg = int(round(stored.shape[1] ** 0.5))
            return align_maps(stored.view(B, sg, sg), meta["box"], meta["flip"], g).view(B, 1, g, g)
        if self.extractor == "frozen":
            return self.frozen(images)  # [B, H', g, g], resized to this grid if its own differs
        net = self._online if self.extractor == "online" else self.ema
        dtype = net.patch_embed.proj.weight.dtype
        return net(images.to(dtype), cls_attention=self.attention_mode).view(B, -1, g, g)

    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        B, g, L = images.shape[0], self.grid, self.num_patches
        maps = self.extract(images, meta)
        dtype = self.generator.conv1.weight.dtype
        logp = self.generator(maps.to(dtype))  # [B, L] fp32
        noise = sample_noise.of(meta)
        u = noise.rand(B, 2 * L + 5 + L, device=images.device) if noise.keyed else None  # one draw: Gumbel | token scale | pseudo masks
        m = gumbel_mask(logp, None if u is None else u[:, :L])  # [B, L], soft, rows sum to 1
        real = pseudo_masks(B, g, device=images.device, u=None if u is None else u[:, 2 * L:])
        scores = self.discriminator(torch.cat([real, m.detach(), m]).view(3 * B, 1, g, g).to(dtype))
        d_real, d_sg, d_gen = scores.split(B)
        loss_d, routed_g, loss_g = lsgan_terms(d_real, d_sg, d_gen, self.lam)

        b_st = straight_through_topk(m, self.num_visible)
        s = (torch.rand_like(m) if u is None else u[:, L:2 * L].to(m.dtype)) + 0.5 * b_st  # [B, L]
        order = s.detach().argsort(dim=1, descending=True)
        M, T = self.num_masked, self.num_thrown
        self.last_weights = m.detach()
        return MaskPlan(
            visible=order[:, M + T:], masked=order[:, :M], thrown=order[:, M:M + T], num_patches=L,
            token_scale=s + (1.0 - s).detach(),  # value 1, d/ds = 1: tokens x' = s x + sg(1 - s) x
            aux_loss=routed_g + loss_d,
            aux_terms={"loss_g": loss_g, "loss_d": loss_d.detach(), "d_real": d_real.mean().detach(),
                       "d_fake": d_gen.mean().detach()},
        )

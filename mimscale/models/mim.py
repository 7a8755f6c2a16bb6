"""MIMModel: the one module handed to DeepSpeed (masking + encoder + decoder + loss).

Keeping the masker inside the engine's module means its parameters (AutoMAE's generator) are
partitioned, gathered under ZeRO-3 and trained by the same optimizer step as the MAE.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimscale.data.normalize import Normalizer
from mimscale.masking.base import Masker, MaskPlan
from mimscale.models.decoder import MAEDecoder
from mimscale.models.losses import masked_pixel_loss
from mimscale.models.vit import ViTEncoder


class MIMModel(nn.Module):
    def __init__(self, encoder: ViTEncoder, decoder: Optional[MAEDecoder], masker: Masker, norm_pix: bool = True,
                 objective: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder  # None for objectives without a pixel decoder (C-MAE)
        self.masker = masker
        self.objective = objective  # None: MAE's reconstruction below; R-MAE / C-MAE: see mimscale/objectives
        self.norm_pix = norm_pix
        self.patch_size = encoder.patch_size
        self.normalizer = Normalizer(scale=255)  # ImageNet mean/std buffers on the device, not in the state_dict
        self.last_plan: MaskPlan | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> fp32 [B, 3, H, W] normalized with ImageNet mean/std (on the device;
        mimscale.data.normalize). A method of the model: AMT's refresh normalizes through it."""
        return self.normalizer.normalize(images)

    def forward(self, images: torch.Tensor, meta: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images uint8 [B, 3, H, W]; meta: box [B, 4], flip [B], index [B] (device tensors).
        Returns (loss, detached terms)."""
        x = self.normalize(images)  # fp32, also the loss target
        plan = self.masker(x, meta)
        self.last_plan = plan
        if self.objective is not None:
            loss, terms = self.objective(x, plan, meta)  # meta: its keyed noise (C-MAE's second view)
        else:
            dtype = self.encoder.patch_embed.proj.weight.dtype  # bf16 under a bf16 engine
            latent = self.encoder(x.to(dtype), plan.visible, plan.token_scale)
            pred = self.decoder(latent, plan)
            loss, terms = masked_pixel_loss(pred, x, plan.masked, self.patch_size, self.norm_pix)
        if plan.aux_loss is not None:  # one loss, one backward: the method routed its terms' gradients
            loss = loss + plan.aux_loss
            terms.update(plan.aux_terms)
        return loss, terms

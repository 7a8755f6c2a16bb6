"""MIMModel: the one module handed to DeepSpeed (masking + encoder + decoder + loss).

Keeping the masker inside the engine's module means its parameters (AutoMAE's generator) are
partitioned, gathered under ZeRO-3 and trained by the same optimizer step as the MAE.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimscale.losses import masked_pixel_loss
from mimscale.masking.base import Masker, MaskPlan
from mimscale.models.decoder import MAEDecoder
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.last_plan: MaskPlan | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> fp32 normalized with ImageNet mean/std (done on the device)."""
        return (images.float() - self.mean.float()) / self.std.float()

    def forward(self, images: torch.Tensor, meta: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images uint8 [B, 3, H, W]; meta: box [B, 4], flip [B], index [B] (device tensors).
        Returns (loss, detached terms)."""
        x = self.normalize(images)  # fp32, also the loss target
        plan = self.masker(x, meta)
        self.last_plan = plan
        if self.objective is not None:
            loss, terms = self.objective(x, plan)
        else:
            dtype = self.encoder.patch_embed.proj.weight.dtype  # bf16 under a bf16 engine
            latent = self.encoder(x.to(dtype), plan.visible, plan.token_scale)
            pred = self.decoder(latent, plan)
            loss, terms = masked_pixel_loss(pred, x, plan.masked, self.patch_size, self.norm_pix)
        if plan.aux_loss is not None:  # one loss, one backward: the method routed its terms' gradients
            loss = loss + plan.aux_loss
            terms.update(plan.aux_terms)
        return loss, terms


def build_model(cfg, masker_factory=None) -> MIMModel:
    """Encoder, decoder and masker from a Config (see config.py)."""
    from mimscale.masking import build_masker
    from mimscale.objectives import build_objective, needs_decoder

    spec = ENCODERS[cfg.model.name]
    encoder = ViTEncoder(spec, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size)
    decoder = MAEDecoder(
        spec.dim,
        encoder.grid,
        encoder.patch_size,
        dim=cfg.model.decoder_dim,
        depth=cfg.model.decoder_depth,
        heads=cfg.model.decoder_heads,
    ) if needs_decoder(cfg) else None
    masker = (masker_factory or build_masker)(cfg, encoder)
    objective = build_objective(cfg, encoder, decoder)
    return MIMModel(encoder, decoder, masker, norm_pix=cfg.model.norm_pix_loss, objective=objective)

"""The model's pixel prediction for the mask grids (masking/viz.py), un-normalized to pixels.

Run at the grids' cadence only, on the last micro batch's images and the plan its training
forward used (``MIMModel.last_plan``): no masker draw, no gradient, eval mode (nothing random), so
the training run's numbers and RNG streams are the same with or without grids. The weights are
those after that step's optimizer update. Under ZeRO-3 the forward gathers parameters (collectives):
every rank calls ``reconstruct``, rank 0 draws.

Each family predicts in its own space:
    MAE path (random, blockwise, AMT, AutoMAE)  the decoder at the visible and masked positions; with
                                                ``model.norm_pix_loss`` the targets were each patch's
                                                pixels normalized by that patch's own mean and variance,
                                                so a prediction is mapped back with the mean and
                                                variance of the same patch of the input (MAE's demo)
    R-MAE                                        the shared decoder on view T1 (plan.visible), as the
                                                MAE path, with the objective's norm_pix
    SimMIM, AMT on SimMIM                       the linear head at every token the encoder saw
                                                (visible and masked); the target is the normalized
                                                image itself, no per-patch statistics
    C-MAE                                        none (its loss compares encodings, not pixels)
Thrown patches (AMT) are in no family's output.
"""
from __future__ import annotations

from typing import Optional

import deepspeed
import torch

from mimscale.masking.base import MaskPlan
from mimscale.masking.viz import Reconstruction
from mimscale.models.losses import patchify, unpatchify
from mimscale.models.mim import MIMModel
from mimscale.models.vit import gather_tokens
from mimscale.objectives.rmae import RMAEObjective
from mimscale.objectives.simmim import SimMIMObjective

NORM_EPS = 1e-6  # masked_pixel_loss's variance epsilon


def plan_rows(plan: MaskPlan, n: int) -> MaskPlan:
    """The plan of the first ``n`` samples (the method's auxiliary loss left out)."""
    return MaskPlan(visible=plan.visible[:n], masked=plan.masked[:n], thrown=plan.thrown[:n], num_patches=plan.num_patches,
                    token_scale=None if plan.token_scale is None else plan.token_scale[:n])


def _decoded(encoder, decoder, x: torch.Tensor, plan: MaskPlan, token_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's output at the visible and masked positions: (pred [B, V + M, P], their patch indices [B, V + M])."""
    latent = encoder(x.to(encoder.patch_embed.proj.weight.dtype), plan.visible, token_scale)
    masked, visible = decoder(latent, plan, with_visible=True)
    return torch.cat([visible, masked], dim=1), torch.cat([plan.visible, plan.masked], dim=1)


def to_pixels(pred: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, patch: int, norm_pix: bool, model: MIMModel) -> Reconstruction:
    """pred [B, K, p*p*3] at patch indices idx [B, K], in the loss's target space for the
    normalized images x [B, 3, H, W] -> Reconstruction (pixels in 0..255, the K patches predicted)."""
    patches = patchify(x.float(), patch)  # [B, L, P]
    pred = pred.float()
    if norm_pix:  # undo the target's per-patch normalization with the input patch's own statistics
        own = gather_tokens(patches, idx)  # [B, K, P]
        mean = own.mean(dim=-1, keepdim=True)
        var = own.var(dim=-1, keepdim=True)  # unbiased, as the loss
        pred = pred * (var + NORM_EPS).sqrt() + mean
    full = torch.zeros_like(patches).scatter(1, idx.unsqueeze(-1).expand_as(pred), pred)  # [B, L, P]
    predicted = torch.zeros(patches.shape[:2], dtype=torch.bool, device=x.device).scatter(1, idx, True)  # [B, L]
    pixels = model.normalizer.denormalize(unpatchify(full, patch, x.shape[-1] // patch))  # [B, 3, H, W] 0..255
    return Reconstruction(pixels=pixels.clamp(0, 255).cpu(), predicted=predicted.cpu())


@torch.no_grad()
def reconstruct(model: MIMModel, images: torch.Tensor, plan: MaskPlan) -> Optional[Reconstruction]:
    """images uint8 [n, 3, H, W] on the model's device, ``plan`` for exactly those n images ->
    the model's prediction in pixels, or None for a method without one (C-MAE)."""
    if plan.batch_size != images.shape[0]:
        raise ValueError(f"a plan for {plan.batch_size} images given with {images.shape[0]} images")
    obj = model.objective
    if obj is not None and not isinstance(obj, (SimMIMObjective, RMAEObjective)):
        return None
    x = model.normalize(images)
    modes = [(m, m.training) for m in model.modules()]  # restored module by module (a frozen part stays in eval)
    model.eval()
    try:
        if obj is None:
            pred, idx = _decoded(model.encoder, model.decoder, x, plan, plan.token_scale)
            norm_pix = model.norm_pix
        elif isinstance(obj, RMAEObjective):
            pred, idx = _decoded(model.encoder, model.decoder, x, plan, None)  # view T1, as its forward
            norm_pix = obj.norm_pix
        else:
            # reconstruct is not the objective's forward, so ZeRO-3's hooks do not gather the
            # objective's own parameters (the mask token) for it: gather them here (a no-op
            # for parameters that are not partitioned)
            with deepspeed.zero.GatheredParameters(list(obj.parameters(recurse=False))):
                pred, idx = obj.reconstruct(x, plan)
            norm_pix = False
    finally:
        for m, mode in modes:
            m.training = mode
    return to_pixels(pred, idx, x, model.patch_size, norm_pix, model)

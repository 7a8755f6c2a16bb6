"""R-MAE (RelaxMIM, Kong & Zhang 2023, Eq. 8): MIM written as occlusion invariance, relaxed.

The masking plan's two sets are two complementary views of each image:
  T1 = plan.visible [B, V],  T2 = plan.masked [B, M]   (V + M = L; nothing thrown)
The encoder f and the ONE shared decoder d (phi = phi') run on each view:
  pred_12 = d(f(T1 x)) at T2's patches            [B, M, P]  (T1's masked patches)
  auto_2  = d(f(T2 x)) at T2's own patches        [B, M, P]  (the decoder's output at T2's tokens)
  loss    = ||pred_12 - auto_2||^2  +  lam ||auto_2 - target(T2)||^2
the distance between the two views' decodings where T1 is occluded, plus the auto-encoding
constraint that keeps d(f(T2 x)) informative (without it both could collapse to a constant).
Gradients flow through both terms into both views, as in Eq. 8. Targets are MAE's
(per-patch normalized pixels with ``norm_pix``), so losses are comparable with MAE's.
"""
from __future__ import annotations

import torch
from torch import nn

from mimscale.masking.base import MaskPlan
from mimscale.models.losses import masked_pixel_loss


class RMAEObjective(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, lam: float = 1.0, norm_pix: bool = True):
        super().__init__()
        # Not submodules: they are MIMModel's, registered (and partitioned) once there.
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_decoder", decoder)
        self.lam = lam
        self.norm_pix = norm_pix

    @staticmethod
    def complement(plan: MaskPlan) -> MaskPlan:
        """The second view's plan: T2's patches visible, T1's masked."""
        return MaskPlan(visible=plan.masked, masked=plan.visible, thrown=plan.thrown, num_patches=plan.num_patches)

    def forward(self, x: torch.Tensor, plan: MaskPlan, meta: dict | None = None) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] normalized fp32; plan from the masker (random masking); meta unused (no draws)."""
        enc, dec = self._encoder, self._decoder
        xin = x.to(enc.patch_embed.proj.weight.dtype)
        pred_12 = dec(enc(xin, plan.visible), plan)  # [B, M, P]
        second = self.complement(plan)
        _, auto_2 = dec(enc(xin, second.visible), second, with_visible=True)  # [B, M, P] at plan.masked
        dist = (pred_12.float() - auto_2.float()).pow(2).mean()
        auto, _ = masked_pixel_loss(auto_2, x, plan.masked, enc.patch_size, self.norm_pix)
        loss = dist + self.lam * auto
        return loss, {"loss_dist": dist.detach(), "loss_ae": auto.detach()}

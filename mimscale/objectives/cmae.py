"""C-MAE (RelaxMIM, Kong & Zhang 2023, section 3): MIM's similarity measured by a token-wise InfoNCE.

Views: the plan's two complementary sets, as in R-MAE; each view keeps all L positions and
replaces the other view's patches with a learned mask token (the paper's default: there is no
decoder to place them), and is colour-jittered on its own (without it the two halves of one
image share colour statistics, a contrastive shortcut).

    online  q_v = predictor(projector(f(view_v)))          [B, L, d] patch tokens
    target  k_v = projector_t(f_t(view_v)), no gradient    [B, L, d]
    loss    = (NCE(q_1, k_2) + NCE(q_2, k_1)) / 2
NCE is token-wise: the positive of online token i is the target token at position i of the other
view, the negatives are the target's other L - 1 tokens of the same image (we chose in-image
negatives: B x L x L logits stay small at any batch, and neighbours in the same image are the
hard negatives that make the tokens spatially specific).
The target (encoder, projector, mask token) is an EMA of the online ones, updated after every
optimizer step by ``EMAHooks`` (masking/ema.py): on each rank's own ZeRO-3 slice, or whole for
the small parameters ZeRO-3 keeps whole on every rank.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.data.normalize import Normalizer
from mimscale.masking.base import MaskPlan
from mimscale.objectives.color import color_jitter


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """The paper's 2-layer heads: Linear, GELU, Linear (token-wise)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def token_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, k [B, L, d] -> mean over B x L of -log softmax_j(<q_i, k_j> / T)[i], cosine similarity."""
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    logits = q @ k.transpose(1, 2) / temperature  # [B, L, L]
    B, L, _ = logits.shape
    labels = torch.arange(L, device=q.device).expand(B, L)
    return F.cross_entropy(logits.reshape(B * L, L), labels.reshape(-1))


class CMAEObjective(nn.Module):
    def __init__(self, encoder: nn.Module, proj_hidden: int = 2048, proj_dim: int = 256, temperature: float = 0.2,
                 jitter: bool = True):
        super().__init__()
        object.__setattr__(self, "_encoder", encoder)  # MIMModel's, registered there
        D = encoder.embed_dim
        self.temperature = temperature
        self.jitter = jitter
        self.mask_token = nn.Parameter(torch.zeros(D))
        nn.init.normal_(self.mask_token, std=0.02)
        self.projector = mlp(D, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        # The target branch: copies at init, then EMAs; never trained by the optimizer.
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.target_mask_token = nn.Parameter(self.mask_token.detach().clone(), requires_grad=False)
        # mean/std in [0, 1] units (scale 1): the jitter works on [0, 1] colours
        self.unit_pixels = Normalizer(scale=1)

    def ema_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online, target) parameter pairs for EMAHooks, in a fixed order."""
        online = [*self._encoder.parameters(), *self.projector.parameters(), self.mask_token]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters(), self.target_mask_token]
        return list(zip(online, target))

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """A colour-jittered copy of normalized images x [B, 3, H, W] (normalized again)."""
        if not self.jitter:
            return x
        return self.unit_pixels.normalize(color_jitter(self.unit_pixels.denormalize(x)))

    def forward(self, x: torch.Tensor, plan: MaskPlan) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] normalized fp32; plan: view 1 keeps plan.visible, view 2 plan.masked."""
        enc = self._encoder
        dtype = enc.patch_embed.proj.weight.dtype
        views = [(self._view(x).to(dtype), plan.masked), (self._view(x).to(dtype), plan.visible)]  # (image, hidden)
        q = [self.predictor(self.projector(enc(img, hidden=hid, mask_token=self.mask_token)[:, 1:])) for img, hid in views]
        with torch.no_grad():
            k = [self.target_projector(self.target_encoder(img, hidden=hid, mask_token=self.target_mask_token)[:, 1:])
                 for img, hid in views]
        loss = 0.5 * (token_nce(q[0], k[1], self.temperature) + token_nce(q[1], k[0], self.temperature))
        return loss, {"loss_nce": loss.detach()}

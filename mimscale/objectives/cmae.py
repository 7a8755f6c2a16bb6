"""C-MAE (RelaxMIM, Kong & Zhang 2023, section 3): MIM's similarity measured by InfoNCE, with the
details of MoCo v3 (Chen et al. 2021), which the paper points to.

Views: two masked copies of each image, T1 and T2, each colour-jittered on its own (two crops of
one image otherwise share its colour statistics, a shortcut the paper names). The masked
positions enter the encoder as a learned mask token (the paper's default; ``mask_token=False``
drops them as MAE's encoder does, the paper's "w/o mask token" row).

    online  q_v = q(p(pool(f(T_v x))))          [B, d]  p: projector, q: predictor (BYOL naming)
    target  k_v = p_t(pool(f_t(T_v x)))          [B, d]  EMA of f, p (and the mask token); no gradient
    loss    = (NCE(q_1, k_2) + NCE(q_2, k_1)) / 2
NCE(q, k): cosine similarities over the temperature, the positive of q_i is k_i, the negatives are
the keys of every other image of the step's batch on every rank (all-gathered, as MoCo v3; keys
carry no gradient, so only the local queries are differentiated). Chance level is log(world x B).

Why whole-image codes and independent masks: a token-wise loss (a query per position, the other
positions as negatives) is solved by position embeddings alone, and so is a pair of complementary
masks (T2 = not T1): one view's mask pattern names the other's. ``views='independent'`` (default)
draws T2's mask on its own, so on images without content nothing identifies the pair and the loss
stays at chance (tests/unit/objectives/test_cmae.py); ``'complementary'`` is Eq. 6 of the paper, kept for
comparison.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.data.normalize import Normalizer
from mimscale.masking import noise as sample_noise
from mimscale.masking.base import MaskPlan
from mimscale.masking.random import RandomMasking
from mimscale.models.partitioned import frozen_copy
from mimscale.objectives.color import JITTER_DRAWS, color_jitter
from mimscale.runtime import dist

VIEWS = ("independent", "complementary")
POOLS = ("cls", "mean")


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """The paper's 2-layer heads: Linear, GELU, Linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def info_nce(q: torch.Tensor, keys: torch.Tensor, first: int, temperature: float) -> torch.Tensor:
    """q [B, d] local queries; keys [N, d] every rank's keys, q_i's positive at row first + i ->
    mean over i of -log softmax_j(cos(q_i, k_j) / T)[first + i]."""
    q, keys = F.normalize(q.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    logits = q @ keys.t() / temperature  # [B, N]
    labels = torch.arange(q.shape[0], device=q.device) + first
    return F.cross_entropy(logits, labels)


class CMAEObjective(nn.Module):
    def __init__(self, encoder: nn.Module, proj_hidden: int = 2048, proj_dim: int = 768, temperature: float = 0.2,
                 jitter: bool = True, views: str = "independent", mask_token: bool = True, pool: str = "cls",
                 mask_ratio: float = 0.75, make_encoder: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        if views not in VIEWS:
            raise ValueError(f"masking.cmae.views {views!r}: allowed values: {', '.join(VIEWS)}")
        if pool not in POOLS:
            raise ValueError(f"masking.cmae.pool {pool!r}: allowed values: {', '.join(POOLS)}")
        object.__setattr__(self, "_encoder", encoder)  # MIMModel's, registered there
        D = encoder.embed_dim
        self.temperature = temperature
        self.jitter = jitter
        self.views = views
        self.pool = pool
        self.use_mask_token = mask_token
        self.second = RandomMasking(encoder.num_patches, mask_ratio)  # T2's own draw (views='independent')
        self.mask_token = nn.Parameter(torch.zeros(D))
        nn.init.normal_(self.mask_token, std=0.02)
        self.projector = mlp(D, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        # The target branch: copies at init, then EMAs; never trained by the optimizer. Under
        # ZeRO-3's zero.Init a copy is a twin built partitioned (make_encoder: the encoder's
        # constructor) and filled one gathered tensor at a time: no rank holds a whole encoder.
        self.target_encoder = frozen_copy(encoder, make_encoder)
        self.target_projector = frozen_copy(self.projector, lambda: mlp(D, proj_hidden, proj_dim))
        self.target_mask_token = nn.Parameter(self.mask_token.detach().clone(), requires_grad=False)
        # mean/std in [0, 1] units (scale 1): the jitter works on [0, 1] colours
        self.unit_pixels = Normalizer(scale=1)
        # keys [B, d] -> (every rank's keys [world B, d], this rank's first row); a test's
        # single-process reference replays the other ranks' keys through it
        self.gather_keys = dist.gather_rows

    def ema_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online, target) parameter pairs for EMAHooks, in a fixed order."""
        online = [*self._encoder.parameters(), *self.projector.parameters(), self.mask_token]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters(), self.target_mask_token]
        return list(zip(online, target))

    def _jittered(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """A colour-jittered copy of normalized images x [B, 3, H, W] (normalized again); u [B, 6]."""
        if not self.jitter:
            return x
        return self.unit_pixels.normalize(color_jitter(self.unit_pixels.denormalize(x), u=u))

    def _code(self, encoder: nn.Module, image: torch.Tensor, plan: MaskPlan, token: torch.Tensor) -> torch.Tensor:
        """One view's whole-image code [B, D]: the encoder on image [B, 3, H, W] with plan.masked
        replaced by ``token`` (or dropped), pooled."""
        if self.use_mask_token:
            out = encoder(image, hidden=plan.masked, mask_token=token)  # [B, 1 + L, D]
        else:
            out = encoder(image, plan.visible)  # [B, 1 + V, D]
        return out[:, 0] if self.pool == "cls" else out[:, 1:].mean(dim=1)

    def view_plans(self, x: torch.Tensor, plan: MaskPlan, meta: dict | None) -> tuple[MaskPlan, MaskPlan]:
        """T1 = the masker's plan; T2 its complement, or an independent draw of the same ratio."""
        if self.views == "complementary":
            return plan, MaskPlan(visible=plan.masked, masked=plan.visible, thrown=plan.thrown, num_patches=plan.num_patches)
        return plan, self.second(x, meta or {})

    def forward(self, x: torch.Tensor, plan: MaskPlan, meta: dict | None = None) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] normalized fp32; plan: the masker's (random masking), view T1."""
        enc = self._encoder
        dtype = enc.patch_embed.proj.weight.dtype
        B = x.shape[0]
        plans = self.view_plans(x, plan, meta)
        u = sample_noise.of(meta).rand(B, 2 * JITTER_DRAWS, device=x.device) if self.jitter else None  # [B, 12]
        images = [self._jittered(x, None if u is None else u[:, v * JITTER_DRAWS:(v + 1) * JITTER_DRAWS]).to(dtype)
                  for v in range(2)]
        q = [self.predictor(self.projector(self._code(enc, img, p, self.mask_token))) for img, p in zip(images, plans)]
        with torch.no_grad():
            k = [self.target_projector(self._code(self.target_encoder, img, p, self.target_mask_token))
                 for img, p in zip(images, plans)]
            gathered = [self.gather_keys(kv.float()) for kv in k]  # ([world B, d], this rank's first row)
        (k1, first), (k2, _) = gathered
        loss = 0.5 * (info_nce(q[0], k2, first, self.temperature) + info_nce(q[1], k1, first, self.temperature))
        return loss, {"loss_nce": loss.detach()}

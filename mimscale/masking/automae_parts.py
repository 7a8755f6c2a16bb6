"""AutoMAE's small networks and pseudo masks (Chen et al. 2023; ../shared/METHODS.md section 3).

MaskGenerator   attention maps [B, C, g, g] -> log-probabilities over the L = g*g patches
Discriminator   a mask image [B, 1, g, g] -> one LSGAN score per mask (spectral-norm convs, no sigmoid)
pseudo_masks    the "real" masks D learns to accept: a soft random rectangle per sample
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from mimscale.masking.noise import gumbel_softmax
from mimscale.models.partitioned import gathered


class MaskGenerator(nn.Module):
    """Conv(C -> C/2, 3x3) -> ReLU -> Conv(C/2 -> 1, 3x3) -> log-softmax over patches.
    C = attention heads (or 1 for the head-averaged stored maps)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [B, C, g, g] -> log-probabilities [B, g*g] (float32)."""
        x = self.conv2(F.relu(self.conv1(maps)))
        return F.log_softmax(x.flatten(1).float(), dim=1)


def _spectral_norm(conv: nn.Conv2d) -> nn.Conv2d:
    """``spectral_norm(conv)``, its weight gathered first: the parametrization's power iteration
    starts from the weight when it is registered, and under ZeRO-3's zero.Init the conv's weight is
    already a placeholder by then (a no-op gather otherwise)."""
    with gathered([conv.weight]):
        return spectral_norm(conv)


class Discriminator(nn.Module):
    """SN-Conv(1->16, k4 s2 p1, no bias) -> LeakyReLU(0.2) -> SN-Conv(16->32, k4 s2 p1) -> LeakyReLU(0.2)
    -> SN-Conv(32->1, k = what is left) -> one score. For g = 14: 14 -> 7 -> 3 -> 1 (8,769 parameters).

    Spectral norm is torch's parametrization: every forward in training mode runs one power
    iteration, so a batch is scored in ONE call (all scores see the same normalized weights)."""

    def __init__(self, grid: int):
        super().__init__()
        left = (grid // 2) // 2
        if left < 1:
            raise ValueError(f"AutoMAE's discriminator needs a patch grid of at least 4 x 4, got {grid} x {grid}")
        self.conv1 = _spectral_norm(nn.Conv2d(1, 16, 4, stride=2, padding=1, bias=False))
        self.conv2 = _spectral_norm(nn.Conv2d(16, 32, 4, stride=2, padding=1))
        self.conv3 = _spectral_norm(nn.Conv2d(32, 1, left))

    def _match_power_iteration_dtype(self, dtype: torch.dtype) -> None:
        """A bf16 engine casts the weights but not spectral norm's u, v buffers (DeepSpeed converts
        parameters only); the power iteration's matrix-vector products need one dtype."""
        for conv in (self.conv1, self.conv2, self.conv3):
            sn = conv.parametrizations.weight[0]
            if sn._u.dtype != dtype:
                sn._u.data = sn._u.data.to(dtype)
                sn._v.data = sn._v.data.to(dtype)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [B, 1, g, g] -> scores [B] (float32)."""
        self._match_power_iteration_dtype(masks.dtype)
        x = F.leaky_relu(self.conv1(masks), 0.2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        return self.conv3(x).flatten().float()


def pseudo_masks(batch: int, grid: int, device=None, generator: Optional[torch.Generator] = None,
                 with_rectangles: bool = False, u: Optional[torch.Tensor] = None):
    """[B, g*g] soft masks, each a softmax over patches of U(0,1) noise plus 0.5 inside a random
    rectangle. At g = 14 (the paper's): area 40..160 patches, one side 4..10, the other
    min(14, ceil(area / side)), either orientation; other grids scale these with g.
    ``with_rectangles``: also return the rectangles as a [B, g*g] bool. ``u`` [B, 5 + g*g]: the
    uniforms to use (keyed noise, see masking/noise.py); else drawn from ``generator``."""
    L = grid * grid
    if u is None:
        u = torch.rand(batch, 5 + L, device=device, generator=generator)
    u_area, u_side, u_tall, u_y, u_x, u_soft = u.split([1, 1, 1, 1, 1, L], dim=1)
    u_area, u_side, u_tall, u_y, u_x = (v.squeeze(1) for v in (u_area, u_side, u_tall, u_y, u_x))
    a_lo, a_hi = max(1, round(40 / 196 * L)), max(1, round(160 / 196 * L))
    s_lo, s_hi = max(1, round(4 / 14 * grid)), max(1, round(10 / 14 * grid))
    area = (a_lo + u_area * (a_hi - a_lo + 1)).floor().clamp(max=a_hi)
    side = (s_lo + u_side * (s_hi - s_lo + 1)).floor().clamp(max=s_hi)
    other = torch.minimum(torch.ceil(area / side), torch.tensor(float(grid), device=device))
    tall = u_tall < 0.5
    h = torch.where(tall, other, side)
    w = torch.where(tall, side, other)
    y0 = (u_y * (grid - h + 1)).floor()
    x0 = (u_x * (grid - w + 1)).floor()
    r = torch.arange(grid, device=device, dtype=torch.float32)
    inside_y = (r[None] >= y0[:, None]) & (r[None] < (y0 + h)[:, None])  # [B, g]
    inside_x = (r[None] >= x0[:, None]) & (r[None] < (x0 + w)[:, None])
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(batch, L)
    masks = torch.softmax(u_soft + 0.5 * inside.float(), dim=1)
    return (masks, inside) if with_rectangles else masks


def lsgan_terms(d_real: torch.Tensor, d_sg: torch.Tensor, d_gen: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSGAN losses from ONE discriminator call on [real, sg(m), m] (scores [B] each).

    Returns (L_D, L_G', L_G): L_D = (d_real - 1)^2 + d_sg^2 trains D only (sg(m) carries no path to
    the generator); L_G' = lam ((d_gen - 1)^2 - (d_sg - 1)^2) is what the step adds: d_gen and d_sg
    have equal values from the same weights, so D's gradients from the two halves cancel exactly
    and only the generator learns from it; L_G = lam (d_gen - 1)^2 is its value, for logging."""
    loss_d = (d_real - 1).pow(2).mean() + d_sg.pow(2).mean()
    loss_g = lam * (d_gen - 1).pow(2).mean()
    routed = loss_g - lam * (d_sg - 1).pow(2).mean()
    return loss_d, routed, loss_g.detach()


def straight_through_topk(m: torch.Tensor, k: int) -> torch.Tensor:
    """Hard top-k indicator of m [B, L] in the forward, the gradient of m in the backward."""
    b = torch.zeros_like(m).scatter_(1, m.topk(k, dim=1).indices, 1.0)
    return b - m.detach() + m


def sigma_max(conv: nn.Module) -> float:
    """Largest singular value of a (spectral-normalized) conv's weight as a matrix [out, in*k*k]."""
    w = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    return float(torch.linalg.matrix_norm(w, ord=2))


def gumbel_mask(logp: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample (tau = 1) of log-probabilities [B, L]: rows sum to 1. ``u`` [B, L]:
    the noise's uniforms (keyed noise, see masking/noise.py); else torch's own draw."""
    if u is None:
        return F.gumbel_softmax(logp, tau=1.0, hard=False, dim=1)
    return gumbel_softmax(logp, u, tau=1.0, dim=1)


__all__ = ["MaskGenerator", "Discriminator", "pseudo_masks", "lsgan_terms", "straight_through_topk", "sigma_max",
           "gumbel_mask"]

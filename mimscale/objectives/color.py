"""SimSiam's colour augmentation for a batch on the device, with parameters drawn per sample.

C-MAE jitters each masked view independently: two complementary views of one image otherwise
share its colour statistics, a shortcut for the contrastive loss (RelaxMIM, section 3).
torchvision's ColorJitter draws one set of factors per call; here every image gets its own, in a
handful of batched tensor ops (no per-sample Python loop):
  with p = 0.8: brightness, contrast, saturation in [1 - 0.4, 1 + 0.4], hue shift in [-0.1, 0.1]
  of a turn, applied in that fixed order; then grayscale with p = 0.2.
Hue is a rotation of the chroma plane in YIQ space: a linear map, so it batches as one matmul.
The draws come from ``u`` [B, JITTER_DRAWS] uniforms when given (keyed per sample, see
masking/noise.py: a sample's jitter then does not depend on how the global batch is split).
"""
from __future__ import annotations

import math

import torch

# RGB -> luma (ITU-R 601), the weights torchvision's grayscale uses
LUMA = (0.299, 0.587, 0.114)
JITTER_DRAWS = 6  # uniforms per image: apply?, brightness, contrast, saturation, hue, grayscale?
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _luma(x: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1] -> [B, 1, H, W]."""
    w = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """shift [B] in turns -> [B, 3, 3] RGB -> RGB maps rotating the (I, Q) plane by 2 pi shift."""
    yiq = RGB_TO_YIQ.to(shift.device, shift.dtype)
    theta = 2 * math.pi * shift
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(shift.shape[0], 3, 3, device=shift.device, dtype=shift.dtype)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x: torch.Tensor, strength: float = 0.4, hue: float = 0.1, p_jitter: float = 0.8,
                 p_gray: float = 0.2, generator: torch.Generator | None = None,
                 u: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, 3, H, W] RGB in [0, 1] (float) -> jittered copy, clamped to [0, 1]. ``u`` [B, 6]: the
    uniforms to use (columns in JITTER_DRAWS order); else drawn from ``generator``."""
    B = x.shape[0]
    if u is None:
        u = torch.rand(B, JITTER_DRAWS, device=x.device, generator=generator)
    cols = iter(u.to(x.dtype).unbind(1))

    def draw(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * next(cols)).view(B, 1, 1, 1)

    on = (next(cols) < p_jitter).to(x.dtype).view(B, 1, 1, 1)
    lo, hi = 1 - strength, 1 + strength
    y = (x * draw(lo, hi)).clamp(0, 1)  # brightness
    mean = _luma(y).mean(dim=(2, 3), keepdim=True)
    y = (mean + draw(lo, hi) * (y - mean)).clamp(0, 1)  # contrast: towards the image's mean gray
    gray = _luma(y)
    y = (gray + draw(lo, hi) * (y - gray)).clamp(0, 1)  # saturation: towards the pixel's gray
    shift = draw(-hue, hue).view(B)
    y = torch.einsum("bij,bjhw->bihw", _hue_matrices(shift), y).clamp(0, 1)
    y = on * y + (1 - on) * x
    to_gray = (next(cols) < p_gray).to(x.dtype).view(B, 1, 1, 1)
    return to_gray * _luma(y).expand_as(y) + (1 - to_gray) * y

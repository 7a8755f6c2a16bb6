"""Mask grids for tracking: what a masking method did to a few images of a batch.

One row per sample, three panels: the image as trained on (the crop) | the method's per-patch
weights (AMT's aligned attention, AutoMAE's mask probabilities; grey when the method has none) |
the plan: visible patches as they are, masked ones tinted red, thrown ones dark blue.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from mimscale.masking.base import MaskPlan

MASKED_RGB = np.array([220, 40, 40], dtype=np.float32)
THROWN_RGB = np.array([20, 30, 90], dtype=np.float32)
# A dark-to-bright ramp (black, purple, orange, pale yellow) for the weights panel.
RAMP = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32)


def heat(values: np.ndarray) -> np.ndarray:
    """values [...] in [0, 1] -> RGB [..., 3] float along RAMP."""
    x = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    lo = np.minimum(x.astype(int), len(RAMP) - 2)
    f = (x - lo)[..., None]
    return RAMP[lo] * (1 - f) + RAMP[lo + 1] * f


def plan_labels(plan: MaskPlan, row: int) -> np.ndarray:
    """[L] int8 for one sample: 0 visible, 1 masked, 2 thrown."""
    lab = np.zeros(plan.num_patches, dtype=np.int8)
    lab[plan.masked[row].cpu().numpy()] = 1
    lab[plan.thrown[row].cpu().numpy()] = 2
    return lab


def plan_grid(images: torch.Tensor, plan: MaskPlan, weights: Optional[torch.Tensor], patch: int, rows: int = 8) -> np.ndarray:
    """images [B, 3, H, W] uint8, plan for those images, weights [B, L] or None ->
    an RGB uint8 array [rows * H, 3 * W, 3] (rows capped at B)."""
    n = min(rows, images.shape[0])
    imgs = images[:n].detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)  # [n, H, W, 3]
    H, W = imgs.shape[1:3]
    g = H // patch

    def up(per_patch: np.ndarray) -> np.ndarray:  # [g*g, ...] -> [H, W, ...] nearest
        return np.repeat(np.repeat(per_patch.reshape(g, g, *per_patch.shape[1:]), patch, 0), patch, 1)

    w = None if weights is None else weights[:n].detach().float().cpu().numpy()
    out = []
    for i in range(n):
        if w is None:
            wpanel = np.full((H, W, 3), 128.0, dtype=np.float32)
        else:
            wi = w[i]
            span = wi.max() - wi.min()
            wpanel = up(heat((wi - wi.min()) / span if span > 0 else np.zeros_like(wi)))
        lab = up(plan_labels(plan, i))[..., None]  # [H, W, 1]
        ppanel = np.where(lab == 1, 0.45 * imgs[i] + 0.55 * MASKED_RGB, imgs[i])
        ppanel = np.where(lab == 2, THROWN_RGB, ppanel)
        out.append(np.concatenate([imgs[i], wpanel, ppanel], axis=1))
    return np.clip(np.concatenate(out, axis=0), 0, 255).astype(np.uint8)


def save_plan_grid(path: str | Path, images: torch.Tensor, plan: MaskPlan, weights: Optional[torch.Tensor], patch: int, rows: int = 8) -> Path:
    """Write ``plan_grid`` as a PNG (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    grid = plan_grid(images, plan, weights, patch, rows)
    zoom = max(1, 128 // images.shape[-1])  # small CPU-run images: enlarge so patches are visible
    if zoom > 1:
        grid = np.repeat(np.repeat(grid, zoom, 0), zoom, 1)
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
    return path

"""Mask grids: what a masking method did to a few images of a batch, and what the model made of it.

One row per sample; panels left to right (the picture of MAE's demo, plus the method's weights):

    original         the image as trained on (the crop)
    masked input     what the encoder sees: visible patches as they are, masked ones grey,
                     thrown ones (AMT: in neither the encoder, the decoder nor the loss) hatched blue
    reconstruction   the model's pixel prediction (``Reconstruction``), un-normalized to pixels;
                     a patch it predicts nothing for keeps the masked-input panel's marker
    + visible        the reconstruction with the visible patches pasted from the original
    weights          only for methods that have per-patch weights (AMT's aligned attention,
                     AutoMAE's mask probabilities), min-max scaled per image along a heat ramp

A method without a pixel prediction (C-MAE's loss is contrastive) gets no reconstruction panels.
``save_plan_grid`` adds a title over each column and a legend naming the markers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mimscale.masking.base import MaskPlan

MASKED_RGB = np.array([128, 128, 128], dtype=np.float32)  # flat grey: MAE's demo shows masked patches blank
THROWN_RGB = np.array([20, 30, 90], dtype=np.float32)  # thrown: dark blue ...
HATCH_RGB = np.array([120, 150, 235], dtype=np.float32)  # ... with light diagonal stripes (no photo looks like it)
HATCH_PERIOD = 6  # pixels between stripes (before the zoom), 2 of them striped
# A dark-to-bright ramp (black, purple, orange, pale yellow) for the weights panel.
RAMP = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32)
VISIBLE, MASKED, THROWN = 0, 1, 2  # plan_labels' codes


@dataclass
class Reconstruction:
    """The model's prediction for the first rows of a batch, in pixel units (what
    ``mimscale.tracking.reconstruct`` computes).

    pixels     [n, 3, H, W] float32 in 0..255: un-normalized predictions; meaningless where not predicted
    predicted  [n, L] bool: the patches the model predicted (MAE: visible and masked; never thrown ones)
    """

    pixels: torch.Tensor
    predicted: torch.Tensor


def heat(values: np.ndarray) -> np.ndarray:
    """values [...] in [0, 1] -> RGB [..., 3] float along RAMP."""
    x = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    lo = np.minimum(x.astype(int), len(RAMP) - 2)
    f = (x - lo)[..., None]
    return RAMP[lo] * (1 - f) + RAMP[lo + 1] * f


def hatch(h: int, w: int) -> np.ndarray:
    """The thrown marker [h, w, 3] float: THROWN_RGB with HATCH_RGB diagonal stripes."""
    yy, xx = np.mgrid[:h, :w]
    stripe = ((yy + xx) % HATCH_PERIOD < 2)[..., None]
    return np.where(stripe, HATCH_RGB, THROWN_RGB)


def plan_labels(plan: MaskPlan, row: int) -> np.ndarray:
    """[L] int8 for one sample: VISIBLE, MASKED or THROWN."""
    lab = np.full(plan.num_patches, VISIBLE, dtype=np.int8)
    lab[plan.masked[row].cpu().numpy()] = MASKED
    lab[plan.thrown[row].cpu().numpy()] = THROWN
    return lab


def grid_panels(images: torch.Tensor, plan: MaskPlan, weights: Optional[torch.Tensor], patch: int,
                recon: Optional[Reconstruction] = None, rows: int = 8) -> tuple[list[str], np.ndarray]:
    """images [B, 3, H, W] uint8, the plan for them, weights [B, L] or None, recon for (at least)
    the first rows or None -> (panel titles, RGB uint8 [n * H, len(titles) * W, 3]), n = min(rows, B)."""
    n = min(rows, images.shape[0])
    imgs = images[:n].detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)  # [n, H, W, 3]
    H, W = imgs.shape[1:3]
    g = H // patch
    if g * patch != H or W != H:
        raise ValueError(f"mask grids need square images tiled by {patch}-px patches, got {H} x {W}")

    def up(per_patch: np.ndarray) -> np.ndarray:  # [g*g, ...] -> [H, W, ...] nearest
        return np.repeat(np.repeat(per_patch.reshape(g, g, *per_patch.shape[1:]), patch, 0), patch, 1)

    thrown_marker = hatch(H, W)
    titles = ["original", "masked input"]
    if recon is not None:
        titles += ["reconstruction", "+ visible pasted"]
        rec = recon.pixels[:n].detach().float().cpu().permute(0, 2, 3, 1).numpy()  # [n, H, W, 3]
        pred = recon.predicted[:n].detach().cpu().numpy()  # [n, L]
    w = None if weights is None else weights[:n].detach().float().cpu().numpy()
    if w is not None:
        titles.append("mask weights")
    out = []
    for i in range(n):
        lab = up(plan_labels(plan, i))[..., None]  # [H, W, 1]
        # what an unpredicted patch shows: grey when masked or visible, the hatch when thrown
        blank = np.where(lab == THROWN, thrown_marker, MASKED_RGB)
        masked_in = np.where(lab == VISIBLE, imgs[i], blank)
        panels = [imgs[i], masked_in]
        if recon is not None:
            got = up(pred[i])[..., None]  # [H, W, 1] bool
            full = np.where(got, rec[i], blank)
            pasted = np.where(lab == VISIBLE, imgs[i], full)
            panels += [full, pasted]
        if w is not None:
            wi = w[i]
            span = wi.max() - wi.min()
            panels.append(up(heat((wi - wi.min()) / span if span > 0 else np.zeros_like(wi))))
        out.append(np.concatenate(panels, axis=1))
    return titles, np.clip(np.rint(np.concatenate(out, axis=0)), 0, 255).astype(np.uint8)


def plan_grid(images: torch.Tensor, plan: MaskPlan, weights: Optional[torch.Tensor], patch: int,
              recon: Optional[Reconstruction] = None, rows: int = 8) -> np.ndarray:
    """``grid_panels``' picture alone: RGB uint8 [n * H, panels * W, 3]."""
    return grid_panels(images, plan, weights, patch, recon, rows)[1]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def legend(plan: MaskPlan, recon: Optional[Reconstruction]) -> str:
    """The line under the titles naming what the markers mean in this grid."""
    parts = ["grey: masked" + (" (the model predicts these)" if recon is not None else "")]
    if plan.thrown.shape[1]:
        parts.append("blue hatch: thrown (no encoder, decoder or loss)")
    if recon is None:
        parts.append("no pixel prediction (the objective is not a reconstruction)")
    return "; ".join(parts)


def _wrap(text: str, width: float, measure) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` (as ``measure`` says; a longer word alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def spaced(grid: np.ndarray, rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """grid [rows * h, cols * w, 3] -> the same tiles with ``gap`` white pixels between them."""
    h, w = grid.shape[0] // rows, grid.shape[1] // cols
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=grid.dtype)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = grid[r * h:(r + 1) * h, c * w:(c + 1) * w]
    return out


def labelled(grid: np.ndarray, titles: list[str], note: str, gap: int = 0) -> np.ndarray:
    """grid [h, w, 3] uint8 of len(titles) equal-width columns ``gap`` pixels apart -> the same
    below a white header: each column's title, then ``note`` wrapped to the grid's width."""
    font = _font(12)
    line = 16
    panel_w = (grid.shape[1] + gap) // len(titles)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    notes = _wrap(note, grid.shape[1] - 8, lambda t: measure(t, font=font))
    header = Image.new("RGB", (grid.shape[1], (1 + len(notes)) * line + 4), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for k, title in enumerate(titles):
        draw.text((k * panel_w + 4, 2), title, fill=(0, 0, 0), font=font)
    for k, text in enumerate(notes):
        draw.text((4, (1 + k) * line + 2), text, fill=(60, 60, 60), font=font)
    return np.concatenate([np.asarray(header), grid], axis=0)


def save_plan_grid(path: str | Path, images: torch.Tensor, plan: MaskPlan, weights: Optional[torch.Tensor], patch: int,
                   recon: Optional[Reconstruction] = None, rows: int = 8) -> Path:
    """Write ``grid_panels`` with its titles and legend as a PNG (atomically: a reader never sees
    half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    titles, grid = grid_panels(images, plan, weights, patch, recon, rows)
    zoom = max(1, 128 // images.shape[-1])  # small CPU-run images: enlarge so patches (and titles) fit
    if zoom > 1:
        grid = np.repeat(np.repeat(grid, zoom, 0), zoom, 1)
    n = min(rows, images.shape[0])
    gap = 2
    grid = spaced(grid, n, len(titles), gap)
    Image.fromarray(labelled(grid, titles, legend(plan, recon), gap)).save(tmp)
    tmp.replace(path)
    return path

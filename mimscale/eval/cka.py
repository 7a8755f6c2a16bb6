"""Occlusion invariance of an encoder: linear CKA between its blocks' features of full images and
of the same images with a ratio r of their patches dropped (Kong & Zhang, CVPR 2023, Fig. 1).

- **Linear CKA** (Kornblith et al. 2019): with column-centered Xc [N, D1], Yc [N, D2],
  CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), in float64. In [0, 1]; invariant to
  orthogonal transforms and isotropic scaling of either side, not to arbitrary linear maps.
  With N < D it is computed from the N x N Gram matrices (same value, smaller products). Small N
  biases it upwards, so compare values measured on the same number of images.
- **Views.** The occluded view drops round(r L) of the L patches of each image, chosen at random
  per image (seeded by (seed, r), so a ratio's masks do not depend on which other ratios are
  measured): dropped patches are removed from the encoder's input, exactly as MAE's encoder skips
  masked ones (``ViTEncoder.forward(images, visible)``). The same drop set is used at every block.
- **Features per block** ([N, D], one row per image): the block's output tokens (before the
  encoder's final norm) averaged over the patches the occluded view KEPT, at the same positions
  in the full view (``tokens="kept"``, default: it compares the tokens both views have, sample by
  sample); or the CLS token (``tokens="cls"``: what the whole view summarizes).
- **Block outputs** are captured with forward hooks on ``encoder.blocks`` during a plain
  ``encoder(x, visible)`` call, so they are the encoder's own (nothing re-implements its forward),
  and the only module called is the encoder: under ZeRO-3 its own hooks gather every parameter
  (``cls_token`` included), with no ``GatheredParameters`` needed; every rank must then make the
  same calls (same N and ratios) because each gather is a collective.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from mimscale.data.eval_transform import CROP_PCT
from mimscale.data.full_pass import WholeImages
from mimscale.data.normalize import normalize_uint8
from mimscale.models.vit import gather_tokens

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))
TOKENS = ("kept", "cls")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """x [N, D1], y [N, D2] (N samples, same order) -> linear CKA in [0, 1]; NaN when either side
    is constant over the samples (no variance to compare)."""
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs x [N, D1] and y [N, D2] with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got {len(x)}")
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    yc = y.double() - y.double().mean(dim=0, keepdim=True)
    if len(x) < max(x.shape[1], y.shape[1]):  # Gram form: tr(Kx Ky) = ||Yc^T Xc||_F^2, ||Kx||_F = ||Xc^T Xc||_F
        kx, ky = xc @ xc.T, yc @ yc.T  # [N, N]
        hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        hsic, nx, ny = (yc.T @ xc).pow(2).sum(), (xc.T @ xc).norm(), (yc.T @ yc).norm()
    if nx == 0 or ny == 0:
        return float("nan")
    return float(hsic / (nx * ny))


def walk_blocks(encoder, x: torch.Tensor, visible: Optional[torch.Tensor] = None,
                reduce: Callable[[torch.Tensor], object] = lambda t: t) -> tuple[list, torch.Tensor]:
    """Run ``encoder(x, visible)`` once -> ([reduce(output of block i) for each block], final
    [B, 1 + V, D]). Block outputs are [B, 1 + V, D] (CLS first), before ``encoder.norm``;
    ``reduce`` shrinks each as soon as it exists, so a deep encoder's states are never all kept."""
    outs: list = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outs.append(reduce(out))) for blk in encoder.blocks]
    try:
        final = encoder(x, visible)
    finally:
        for h in handles:
            h.remove()
    if len(outs) != len(encoder.blocks):  # e.g. a compiled module that bypasses module hooks
        raise RuntimeError(f"captured {len(outs)} block outputs for {len(encoder.blocks)} blocks")
    return outs, final


def drop_masks(num_images: int, num_patches: int, ratio: float, seed: int) -> torch.Tensor:
    """Visible patch indices [N, V] (ascending) with V = L - round(ratio L), at least 1; seeded by
    (seed, ratio) so the masks of one ratio are the same whatever other ratios are measured."""
    keep = max(1, num_patches - int(round(ratio * num_patches)))
    rng = np.random.default_rng([seed, int(round(ratio * 1_000_000))])
    order = rng.random((num_images, num_patches)).argsort(axis=1)[:, :keep]
    return torch.from_numpy(np.sort(order, axis=1)).long()


def check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in ratios)
    if not out:
        raise ValueError("ratios: at least one drop ratio is needed")
    bad = [r for r in out if not (math.isfinite(r) and 0.0 <= r < 1.0)]
    if bad:
        raise ValueError(f"ratios {bad}: each drop ratio must be in [0, 1)")
    if len(set(out)) != len(out):
        raise ValueError(f"ratios {list(out)}: a ratio is listed twice")
    return out


@torch.no_grad()
def cka_by_block(encoder, images: torch.Tensor, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0, *,
                 tokens: str = "kept", batch: int = 64, device=None) -> dict[float, list[float]]:
    """images uint8 [N, 3, S, S] (S = encoder.img_size) -> {ratio: [CKA of block 1 .. depth]}."""
    ratios = check_ratios(ratios)
    if tokens not in TOKENS:
        raise ValueError(f"tokens {tokens!r}: allowed values: {', '.join(TOKENS)}")
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[2:]) != (encoder.img_size, encoder.img_size):
        raise ValueError(f"images are {tuple(images.shape[2:])}, the encoder takes {encoder.img_size} x {encoder.img_size}")
    if len(images) < 2:
        raise ValueError(f"CKA needs at least 2 images, got {len(images)}")
    weight = encoder.patch_embed.proj.weight
    device = torch.device(device) if device is not None else weight.device
    masks = {r: drop_masks(len(images), encoder.num_patches, r, seed) for r in ratios}  # r -> [N, V_r]
    depth = len(encoder.blocks)
    full = {r: [[] for _ in range(depth)] for r in ratios}  # r -> block -> [b, D] chunks
    occl = {r: [[] for _ in range(depth)] for r in ratios}
    for a in range(0, len(images), batch):
        x = normalize_uint8(images[a:a + batch].to(device)).to(weight.dtype)
        vis = {r: m[a:a + batch].to(device) for r, m in masks.items()}

        def full_reduce(out, vis=vis):  # [b, 1 + L, D] -> per ratio [b, D]: the full view at the kept positions
            if tokens == "cls":
                return {r: out[:, 0].float() for r in ratios}
            return {r: gather_tokens(out[:, 1:], vis[r]).float().mean(dim=1) for r in ratios}

        def occl_reduce(out):  # [b, 1 + V, D] -> [b, D]: every patch token of this view is a kept one
            return out[:, 0].float() if tokens == "cls" else out[:, 1:].float().mean(dim=1)

        per_block, _ = walk_blocks(encoder, x, None, full_reduce)
        for i, by_ratio in enumerate(per_block):
            for r in ratios:
                full[r][i].append(by_ratio[r].cpu())
        for r in ratios:
            per_block, _ = walk_blocks(encoder, x, vis[r], occl_reduce)
            for i, f in enumerate(per_block):
                occl[r][i].append(f.cpu())
    return {r: [linear_cka(torch.cat(full[r][i]), torch.cat(occl[r][i])) for i in range(depth)] for r in ratios}


def summarize(result: dict[float, list[float]]) -> str:
    """A table: one row per ratio, one column per block, and the mean over blocks."""
    depth = len(next(iter(result.values())))
    head = "ratio " + " ".join(f"{f'b{i + 1}':>6}" for i in range(depth)) + "   mean"
    rows = [head]
    for r, vals in sorted(result.items()):
        rows.append(f"{r:5.2f} " + " ".join(f"{v:6.3f}" for v in vals) + f" {float(np.mean(vals)):6.3f}")
    return "\n".join(rows)


def plot(result: dict[float, list[float]], path, title: str = "") -> None:
    """PNG like the paper's Fig. 1: CKA over block index, one line per drop ratio."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    items = sorted(result.items())
    for j, (r, vals) in enumerate(items):
        ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=3, color=cmap(j / max(1, len(items) - 1)), label=f"{r:g}")
    ax.set_xlabel("block")
    ax.set_ylabel("linear CKA, full vs occluded")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, len(items[0][1]) + 1))
    ax.grid(alpha=0.3)
    ax.legend(title="drop ratio", fontsize=7, title_fontsize=8, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))


def health_check(encoder, images: torch.Tensor, ratios: Sequence[float] = (0.25, 0.5, 0.75), seed: int = 0, *,
                 tokens: str = "kept", batch: int = 64) -> dict[str, float]:
    """A label-free in-training check: {"cka/r0.50/last": CKA at the last block, "cka/r0.50/mean":
    mean over blocks, ...} for each ratio. ``images`` uint8 [N, 3, S, S] (a fixed set, so values of
    different steps compare). Calls only ``encoder(...)`` (see the module docstring): it works on
    the engine's encoder under ZeRO 1/2/3 and any dtype, when every rank calls it together."""
    result = cka_by_block(encoder, images, ratios, seed, tokens=tokens, batch=batch)
    out = {}
    for r, vals in result.items():
        out[f"cka/r{r:.2f}/last"] = vals[-1]
        out[f"cka/r{r:.2f}/mean"] = float(np.mean(vals))
    return out


def pick_whole_images(source, size: int, count: int, seed: int, crop_pct: float = CROP_PCT) -> torch.Tensor:
    """``count`` images [N, 3, size, size] uint8 of an indexable source (len, read/array, name,
    label: folder, synthetic, a listing) through the evaluation transform (short side resized to
    round(size / crop_pct), bicubic, center crop; mimscale.data.eval_transform), at seeded random
    indices, in index order. An
    unreadable file is replaced by the next index of the permutation, so N = min(count, readable
    images) and the CLI, the quality benchmark and the in-training check measure on equal N."""
    whole = WholeImages(source, size, crop_pct)
    picked: dict[int, torch.Tensor] = {}
    for i in np.random.default_rng(seed).permutation(len(source)):
        s = whole[int(i)]
        if s is not None:
            picked[int(i)] = s[0]
        if len(picked) == count:
            break
    if len(picked) < 2:
        raise ValueError(f"CKA needs at least 2 readable images, found {len(picked)} of {len(source)}")
    return torch.stack([picked[i] for i in sorted(picked)])

"""Can C-MAE's loss be solved from patch positions alone? Two numbers per view choice, one JSON:

    python -m benchmarks.cmae_shortcut [--steps 150] --json

- ``blank``: a small encoder trained ``--steps`` steps on gray images (no content, only the mask
  positions differ between images): the first loss and the mean of the last 10. Chance is
  log(batch); a loss well below it means the pair of views was matched by position.
- ``position_code``: the loss of a code built from positions alone (view 1: the sum of the
  position embeddings it does not see, which a linear predictor can form; view 2: of those it
  sees), at 16 patches / 16 images and at ViT-B scale (196 patches, 768-d, 256 images).
tests/unit/objectives/test_cmae.py asserts the same functions' results.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from mimscale.hooks.ema import EMAHooks
from mimscale.masking.random import RandomMasking
from mimscale.models.registry import EncoderSpec
from mimscale.models.vit import ViTEncoder, sincos_pos_embed_2d
from mimscale.objectives.cmae import VIEWS, CMAEObjective, info_nce

SMALL = EncoderSpec(dim=64, depth=2, heads=2, patch_size=8)  # 32 px: 16 patches
BATCH = 16


def train_on_blank_images(views: str, steps: int = 150, mask_token: bool = True, batch: int = BATCH) -> tuple[float, float]:
    """SMALL trained ``steps`` steps on one gray image repeated ``batch`` times ->
    (first loss, mean loss of the last 10 steps)."""
    torch.manual_seed(0)
    enc = ViTEncoder(SMALL, img_size=32)
    obj = CMAEObjective(enc, proj_hidden=128, proj_dim=64, views=views, mask_token=mask_token)
    masker = RandomMasking(enc.num_patches, 0.75)
    opt = torch.optim.AdamW([p for m in (enc, obj) for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    ema = EMAHooks(obj.ema_pairs(), 0.99)
    x = torch.zeros(batch, 3, 32, 32)  # normalized gray
    losses = []
    for _ in range(steps):
        loss, _ = obj(x, masker(x, {}), {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.after_optimizer_step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / 10


def position_only_loss(views: str, L: int = 16, dim: int = 64, batch: int = BATCH, repeats: int = 20) -> float:
    """Mean loss over ``repeats`` draws of the position-only code (module docstring)."""
    g = torch.Generator().manual_seed(0)
    pe = sincos_pos_embed_2d(dim, int(L ** 0.5))[1:]  # [L, dim]
    V = L // 4
    total = 0.0
    for _ in range(repeats):
        order = torch.rand(batch, L, generator=g).argsort(1)
        q = pe.sum(0) - pe[order[:, :V]].sum(1)  # view 1 sees order[:, :V]
        second = order[:, V:] if views == "complementary" else torch.rand(batch, L, generator=g).argsort(1)[:, :V]
        k = pe[second].sum(1)
        total += info_nce(q - q.mean(0), k - k.mean(0), 0, 0.2).item()
    return total / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = {"chance": math.log(BATCH), "steps": args.steps, "blank": {}, "position_code": {},
           "chance_vit_b": math.log(256)}
    for views in VIEWS:
        for mask_token in (True, False):
            first, last = train_on_blank_images(views, args.steps, mask_token)
            out["blank"][f"{views}{'' if mask_token else '_no_mask_token'}"] = {"first": first, "last10": last}
        out["position_code"][views] = position_only_loss(views)
        out["position_code"][f"{views}_vit_b"] = position_only_loss(views, 196, 768, 256)
    for k, v in out["blank"].items():
        print(f"blank images, {k}: {v['first']:.3f} -> {v['last10']:.3f} (chance {out['chance']:.3f})")
    for k, v in out["position_code"].items():
        print(f"position-only code, {k}: {v:.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

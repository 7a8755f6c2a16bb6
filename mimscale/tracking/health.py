"""In-training occlusion-invariance health check (RelaxMIM's CKA analysis, mimscale/eval/cka.py).

Every ``tracking.cka_every_epochs`` epochs, every rank runs the encoder on the same fixed set of
``tracking.cka_images`` whole images, full and with 25 / 50 / 75% of the patches dropped, and
rank 0 logs the linear CKA between the two (last block and mean over blocks) to MLflow as
``cka/r0.50/last`` etc. A falling curve flags a run that stopped learning occlusion-invariant
features, with no labels and a few forward passes. All ranks take part because under ZeRO-3 each
forward gathers parameters collectively; the time is not billed to training throughput.
"""
from __future__ import annotations

from typing import Optional

import torch

from mimscale.data.eval_transform import CROP_PCT
from mimscale.data.sources import FolderSource, SyntheticSource
from mimscale.data.streams import open_full_pass
from mimscale.eval.cka import health_check, pick_whole_images
from mimscale.runtime import dist

RATIOS = (0.25, 0.5, 0.75)


def fixed_images(data_cfg, source, img_size: int, count: int, seed: int) -> torch.Tensor:
    """The same ``count`` images [N, 3, S, S] uint8 on every rank and every resume, through the
    evaluation transform (as ``python -m mimscale.eval cka``): seeded random indices of an
    indexable source (synthetic, folder), else the first batch of a single-rank full pass (wds, ffcv)."""
    if isinstance(source, (SyntheticSource, FolderSource)):
        return pick_whole_images(source, img_size, count, seed, CROP_PCT)
    images = next(iter(open_full_pass(data_cfg, source, img_size=img_size, batch_size=count, rank=0, world_size=1, seed=seed, crop_pct=CROP_PCT)))["image"]
    if len(images) < 2:
        raise ValueError(f"CKA needs at least 2 images, the first whole-image batch has {len(images)}")
    return images


class CKAHealth:
    def __init__(self, cfg, source, steps_per_epoch: int):
        t = cfg.tracking
        self.interval = max(1, int(round(t.cka_every_epochs * steps_per_epoch))) if t.cka_every_epochs > 0 else 0
        self.cfg, self.source = cfg, source
        self.images: Optional[torch.Tensor] = None
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    @torch.no_grad()
    def run(self, encoder) -> dict[str, float]:
        """Call on every rank at the same step; returns {"cka/r0.50/last": ..., ...}."""
        try:
            if self.images is None:
                c = self.cfg
                self.images = fixed_images(c.data, self.source, c.model.img_size, c.tracking.cka_images, c.train.seed)
            self.last = health_check(encoder, self.images, RATIOS, seed=self.cfg.train.seed)
        except (ValueError, OSError) as e:
            # A monitor must not end a run. The images and the check are the same on every rank, so
            # every rank fails alike here and turns the check off together (no collective is left waiting).
            dist.log0(f"[mimscale] WARNING: CKA health check off for this run: {e}")
            self.interval = 0
            return {}
        return self.last

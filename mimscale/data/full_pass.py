"""One pass over the whole dataset, each sample exactly once across ranks, with no random crop.

Two transforms, chosen by ``crop_pct``:
  - ``None``: the whole image resized to S x S (aspect not kept): AMT's attention refresh, whose
    maps must cover the image that training crops are cut from (``crop.py``, ``scale=None``);
  - a float (evaluation: features for probes and kNN, CKA images): ``mimscale.data.eval_transform``,
    the short side resized to round(S / crop_pct) (bicubic) and the S x S center kept.
Every source gives this rank a disjoint share; together the shares cover the dataset:
  synthetic / folder: the contiguous index block [r N / W, (r + 1) N / W);
  wds:  shard j goes to (rank, worker) slot j mod (W x workers) (the loader's eval mode);
  ffcv: the contiguous block of .beton positions, as above (whole images: FFCV's loader; eval:
        ``FfcvFile.read`` through this module's loader, decoded and cropped in Python).
Batches: ``image`` [B, 3, S, S] uint8, ``index`` [B] int64 global sample indices, ``label`` [B]
int64 class indices (the source's own; feature extraction for linear probes and kNN needs them);
the last batch of a share may be short. Unreadable files are left out (wds, ffcv have none by
construction) and counted in ``skipped``.

This module reads the indexable sources; ``mimscale.data.streams.open_full_pass`` is the entry
point for every source (wds: ShardStream's eval mode, ffcv: FFCVBatches' eval mode).
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mimscale.data.crop import UnreadableImage, crop_array, crop_bytes
from mimscale.data.eval_transform import center_crop, check_crop_pct
from mimscale.data.sources import FfcvFile, SyntheticSource
from mimscale.data.workers import worker_init


def share(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous block of indices (sizes differ by at most one)."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


class WholeImages(Dataset):
    """Position -> (image [3, S, S] uint8, global index, label), or None when the file is
    unreadable. ``crop_pct`` None: the whole image resized to size x size (AMT); else the
    evaluation transform (short side to round(size / crop_pct), bicubic, center size x size).
    An FFCV file's global index is its ``index`` field; every other source's is the position."""

    def __init__(self, source, size: int, crop_pct: Optional[float] = None):
        self.source = source
        self.size = size
        self.crop_pct = None if crop_pct is None else check_crop_pct(crop_pct)
        if self.crop_pct is None and isinstance(source, FfcvFile):
            raise ValueError("whole (uncropped) FFCV images come from FFCV's loader (streams.open_full_pass), not from here")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        rng = np.random.default_rng(0)  # unused: no random draw for whole images
        try:
            data = self.source.array(index) if isinstance(self.source, SyntheticSource) else self.source.read(index)
            if self.crop_pct is not None:
                crop = center_crop(data, self.size, self.crop_pct)
            elif isinstance(data, np.ndarray):
                crop = crop_array(data, rng, self.size, scale=None)
            else:
                crop = crop_bytes(data, rng, self.size, scale=None)
        except (UnreadableImage, OSError) as e:
            print(f"[mimscale.data] full pass: skipping unreadable {self.source.name(index)}: {e}", file=sys.stderr)
            return None
        gidx = self.source.global_index(index) if isinstance(self.source, FfcvFile) else index
        return torch.from_numpy(crop.image).permute(2, 0, 1), gidx, self.source.label(index)


def _collate(samples: list) -> dict:
    good = [s for s in samples if s is not None]
    if not good:
        return {"image": torch.zeros(0, 3, 1, 1, dtype=torch.uint8), "index": torch.zeros(0, dtype=torch.int64),
                "label": torch.zeros(0, dtype=torch.int64), "skipped": torch.tensor(len(samples))}
    return {
        "image": torch.stack([s[0] for s in good]),
        "index": torch.tensor([s[1] for s in good], dtype=torch.int64),
        "label": torch.tensor([s[2] for s in good], dtype=torch.int64),
        "skipped": torch.tensor(len(samples) - len(good)),
    }


def whole_image_loader(source, img_size: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                       num_workers: int = 0, crop_pct: Optional[float] = None) -> DataLoader:
    """This rank's share of one full pass over an indexable source (synthetic, folder; an FFCV file
    with ``crop_pct``); ``crop_pct``: see WholeImages. ``mimscale.data.streams.open_full_pass``
    picks the reader of every source."""
    mine = list(share(len(source), rank, world_size))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return DataLoader(WholeImages(source, img_size, crop_pct), batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                      worker_init_fn=worker_init if num_workers else None, generator=torch.Generator().manual_seed(seed))

"""The loader contract every data source follows.

Each batch is a dict of CPU tensors (pinned on GPU machines):
  image   [B, 3, S, S] uint8   RandomResizedCrop(S) + flip; normalized later, on the device (normalize.py)
  box     [B, 4] float32       crop (x0, y0, x1, y1) as fractions of the original image's W, H
  flip    [B] bool             whether the crop was mirrored after cropping
  index   [B] int64            global sample index (stable across ranks, workers and runs)
  label   [B] int64            class index (folder) or a placeholder (synthetic)
  skipped [] int64             unreadable files skipped while filling this batch (each skip is
                               filled by the next index, cropped with randomness of its own)
  converted [] int64           files that needed a PIL conversion (CMYK, PNG-in-.JPEG, ...)

Ranks and workers split the data without overlap: each epoch is a seeded permutation cut into
global batches, each dealt to (micro step, rank) in chunks (the tail that does not fill a global
batch is dropped for the epoch; see sampler.py), and the DataLoader hands whole batches to workers. Crops are seeded by (seed, epoch,
index), so a batch's content does not depend on which worker made it, and a resumed run (which
restarts the stream at its micro-batch position) sees exactly the batches an uninterrupted run
would have.

This module builds the DataLoader of the indexable sources (folder, synthetic); the other sources'
loaders (wds_loader.py, ffcv_loader.py) follow the same contract, and streams.py picks one.
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mimscale.data import device_decode
from mimscale.data.crop import UnreadableImage, crop_array, crop_bytes
from mimscale.data.sampler import ShardedBatchSampler
from mimscale.data.sources import SyntheticSource, indexed_source
from mimscale.data.workers import worker_init


class CropDataset(Dataset):
    """Map-style dataset keyed by (epoch, index); skips unreadable files by moving to the next index."""

    def __init__(self, source, size: int, scale=(0.2, 1.0), hflip: float = 0.5, seed: int = 0, max_bad_in_a_row: int = 64,
                 fast_idct: bool = True, device_decode: bool = False):
        self.source = source
        self.size = size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.seed = seed
        self.max_bad = max_bad_in_a_row
        self.fast_idct = fast_idct
        # data.decode=nvjpeg: the worker reads bytes and plans the crop; the device decodes (device_decode.py)
        self.device_decode = device_decode
        self._warned = 0

    def __len__(self) -> int:
        return len(self.source)

    def load(self, epoch: int, index: int, slot: Optional[int] = None, attempt: int = 0):
        """Crop sample ``index``; ``slot``/``attempt`` key the randomness of a replacement for an
        unreadable file in slot ``slot``, so it does not repeat its neighbour's own crop."""
        key = [self.seed, epoch, index] if attempt == 0 else [self.seed, epoch, slot, attempt]
        rng = np.random.default_rng(key)
        if isinstance(self.source, SyntheticSource):
            return crop_array(self.source.array(index), rng, self.size, self.scale, self.hflip)
        if self.device_decode:
            return device_decode.plan_bytes(self.source.read(index), rng, self.size, self.scale, self.hflip, self.fast_idct)
        return crop_bytes(self.source.read(index), rng, self.size, self.scale, self.hflip, self.fast_idct)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        n = len(self.source)
        for skipped in range(self.max_bad + 1):
            i = (index + skipped) % n
            try:
                crop = self.load(epoch, i, slot=index, attempt=skipped)
            except (UnreadableImage, OSError) as e:
                if self._warned < 10:  # per worker; the total is counted and logged by the trainer
                    print(f"[mimscale.data] skipping unreadable {self.source.name(i)}: {e}", file=sys.stderr)
                    self._warned += 1
                continue
            if self.device_decode:  # a Planned JPEG or, for a file the device does not take, a Crop
                return {"item": crop, "name": self.source.name(i), "index": i, "label": self.source.label(i), "skipped": skipped}
            return {
                "image": torch.from_numpy(crop.image).permute(2, 0, 1),
                "box": torch.tensor(crop.box, dtype=torch.float32),
                "flip": crop.flip,
                "index": i,
                "label": self.source.label(i),
                "skipped": skipped,
                "converted": int(crop.converted),
            }
        raise RuntimeError(f"{self.max_bad + 1} unreadable files in a row from {self.source.name(index)}: check data.path")


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, S, S] views of HWC crops -> [B, 3, S, S] channels_last (as FFCV's batches): stacking the
    HWC memory is one copy per image; stacking the CHW views would gather strided pixels (~5% of a
    worker's time per image, measured with python -m mimscale.bench loader --source wds)."""
    return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)


def collate(samples: list[dict]) -> dict:
    return {
        "image": stack_images([s["image"] for s in samples]),
        "box": torch.stack([s["box"] for s in samples]),
        "flip": torch.tensor([s["flip"] for s in samples], dtype=torch.bool),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "skipped": torch.tensor(sum(s["skipped"] for s in samples), dtype=torch.int64),
        "converted": torch.tensor(sum(s["converted"] for s in samples), dtype=torch.int64),
    }


def build_loader(data_cfg, *, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int, start_micro_batch: int = 0,
                 pin_memory: bool = False, source=None, accumulation: int = 1):
    """(DataLoader, sampler) for this rank, positioned at micro-batch ``start_micro_batch``, over a
    folder or synthetic source; micro batches dealt from global batches of micro x accumulation x
    world (sampler.py). ``source``: an already built one (saves a second scan of a large folder)."""
    if source is None:
        source = indexed_source(data_cfg, seed)
    on_device = data_cfg.decode == "nvjpeg" and not isinstance(source, SyntheticSource)
    dataset = CropDataset(source, img_size, (data_cfg.scale_min, data_cfg.scale_max), data_cfg.hflip, seed, data_cfg.max_bad_in_a_row,
                          data_cfg.jpeg_idct == "fast", device_decode=on_device)
    sampler = ShardedBatchSampler(len(dataset), micro_batch, rank, world_size, seed, start_micro_batch, accumulation=accumulation)
    workers = data_cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=device_decode.collate if on_device else collate,
        pin_memory=pin_memory,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # A generator of its own: creating the iterator must not consume the global torch RNG,
        # which masking uses and a resumed run restores.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler

"""FFCV (.beton) source under the loader contract of mimscale/data/loader.py.

Importing this module imports ffcv and numba (seconds of start-up; the optional ``[ffcv]`` extra):
mimscale.data.streams imports it only when ``data.source`` is ffcv.

    batches = build_ffcv_loader("train.beton", 224, 64, rank, world, seed, start_micro_batch)
    for batch in batches: ...   # dicts: image [B,3,S,S] uint8, box, flip, index, label, skipped, converted

The .beton (data_prep.ffcv) has fields image (RGBImageField, JPEG), label and index (IntField).

- train: the endless stream of this rank's micro batches in exactly the folder loader's order
  (ShardedBatchSampler's epoch permutation dealt in global batches, incomplete tail dropped), starting at
  micro batch ``start_micro_batch``; a resumed run continues mid-epoch.
- eval: one pass per iteration over this rank's contiguous share (shares differ by at most one
  sample and cover every sample once across ranks); last batch may be short. Epoch 0's crops.

Crops (mimscale.data.ffcv_decode): RandomResizedCrop + flip keyed by (seed, epoch, global index),
so batches do not depend on the thread count, and a resumed stream repeats an uninterrupted one.

``num_workers`` are numba threads inside FFCV's single producer thread. FFCV writes each batch into
one of ``batches_ahead + 2`` reused buffers, and the one just handed out may be overwritten as soon
as the next batch is requested; ``copy=True`` (the default; ~3 ms per 64 images of 224^2, a few
percent of the decode) hands out images that stay valid. ``num_workers`` is capped at numba's thread
pool size. One iteration at a time per FFCVBatches (the epoch is decoder state): close an iterator
(or let it run out) before starting another.
"""
from __future__ import annotations

import atexit
import math
import queue
import weakref
from typing import Iterator

import numba
import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import Loader
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from mimscale.data.ffcv_decode import SeededRandomResizedCrop
from mimscale.data.sampler import ShardedBatchSampler


class PlannedOrder(TraversalOrder):
    """Hands FFCV the sample positions planned for the pass it is starting (FFCV's own orders
    shuffle with their own RNG or interleave ranks). FFCV's Loader accepts an order *instance*
    (``isinstance`` check) and then calls it with the loader."""

    def __init__(self, plan):
        self.plan = plan  # epoch -> uint64 positions in the .beton, in order

    def __call__(self, loader):
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int):
        return self.plan(epoch)


class FFCVBatches:
    """Iterable of contract batches; see the module docstring. Attributes: num_samples,
    batches_per_epoch (train: full batches per epoch; eval: batches of one pass), sampler (train),
    last_decode_scale (M of the last batch, [B] int64: decoded at M/8 of the stored size)."""

    def __init__(self, path: str, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 start_micro_batch: int = 0, *, scale=(0.2, 1.0), hflip: float = 0.5, num_workers: int = 2,
                 mode: str = "train", copy: bool = True, batches_ahead: int = 3, accumulation: int = 1,
                 fast_idct: bool = True):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode {mode!r}: train or eval")
        self.path, self.mode, self.copy = str(path), mode, copy
        self.micro_batch, self.start = micro_batch, start_micro_batch
        reader = Reader(self.path)
        missing = {"image", "label", "index"} - set(reader.field_names)
        if missing:
            raise ValueError(f"{path}: fields {reader.field_names}, missing {sorted(missing)}")
        self.num_samples = n = int(reader.num_samples)
        index_table = reader.metadata[f"f{reader.field_names.index('index')}"]

        if mode == "train":
            self.sampler = ShardedBatchSampler(n, micro_batch, rank, world_size, seed, accumulation=accumulation)
            self.batches_per_epoch = self.sampler.batches_per_epoch
        else:
            self.sampler = None
            lo, hi = rank * n // world_size, (rank + 1) * n // world_size
            self._share = np.arange(lo, hi, dtype=np.uint64)
            self.batches_per_epoch = math.ceil((hi - lo) / micro_batch)
        self._skip = 0  # full batches of the coming pass to leave out (resume mid-epoch)

        self.decoder = SeededRandomResizedCrop(img_size, seed, scale, hflip, index_table, fast_idct)
        # FFCV sets torch's thread count to its worker count: keep the trainer's
        threads = torch.get_num_threads()
        self.loader = Loader(
            self.path, batch_size=micro_batch,
            num_workers=max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS)),
            order=PlannedOrder(self._plan), seed=seed,  # explicit seed: FFCV would draw one from np.random
            drop_last=(mode == "train"), batches_ahead=batches_ahead,
            pipelines={"image": [self.decoder], "label": [IntDecoder()], "index": [IntDecoder()]},
        )
        torch.set_num_threads(threads)
        self._outputs = list(self.loader.pipeline_specs)  # the Loader yields one entry per pipeline, in this order
        self.last_decode_scale = None
        self._producer = None  # FFCV's EpochIterator (a thread) of the running pass
        _LIVE.add(self)

    def _plan(self, epoch: int) -> np.ndarray:
        if self.sampler is None:
            return self._share
        b, full = self.micro_batch, self.batches_per_epoch
        return self.sampler.epoch_indices(epoch).numpy()[self._skip * b: full * b].astype(np.uint64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self.sampler is None:
            yield from self._pass(0, 0)
            return
        epoch, b = self.sampler.position(self.start)
        while True:
            yield from self._pass(epoch, b)
            epoch, b = epoch + 1, 0

    def _pass(self, epoch: int, skip: int) -> Iterator[dict]:
        if self._producer is not None:
            raise RuntimeError("FFCVBatches: another iteration is still running; close it first")
        if self.sampler is None and len(self._share) == 0:
            return
        self._skip = skip
        self.decoder.set_epoch(epoch)
        self.loader.next_epoch = epoch  # the epoch FFCV passes to _plan
        threads = torch.get_num_threads()
        it = iter(self.loader)
        torch.set_num_threads(threads)
        self._producer = it
        try:
            for out in it:
                yield self._batch(dict(zip(self._outputs, out)))
        finally:
            self._producer = None
            _stop(it)

    def close(self) -> None:
        """Stop the running pass, if any (also done at interpreter exit)."""
        if self._producer is not None:
            _stop(self._producer)

    def _batch(self, out: dict) -> dict:
        images, params = out["image"]
        p = torch.from_numpy(params.copy())
        bad = (p[:, 8] != 0).nonzero().flatten()
        if len(bad):
            idx = out["index"][bad.numpy(), 0].tolist()
            raise RuntimeError(f"{self.path}: JPEG decode failed for samples with index {idx} (status {p[bad, 8].tolist()})")
        image = torch.from_numpy(images).permute(0, 3, 1, 2)  # [B,3,S,S] channels_last view of FFCV's buffer
        if self.copy:
            image = image.clone()  # keeps the channels_last layout
        m = p[:, 4].double()
        wh = p[:, [5, 6, 5, 6]].double()
        box = p[:, 0:4].double() * 8.0 / m[:, None] / wh  # scaled-decode pixels -> fractions of W, H
        self.last_decode_scale = p[:, 4].clone()
        return {
            "image": image,
            "box": box.float(),
            "flip": p[:, 7].bool(),
            "index": torch.from_numpy(out["index"][:, 0].astype(np.int64)),  # astype copies: FFCV reuses the buffer
            "label": torch.from_numpy(out["label"][:, 0].astype(np.int64)),
            "skipped": torch.tensor(0, dtype=torch.int64),
            "converted": torch.tensor(0, dtype=torch.int64),
        }


def _stop(it) -> None:
    """Stop FFCV's producer thread and wait for it: no decode may run once the consumer has left
    (the next pass changes the decoder's epoch, and a numba parallel region still running at
    interpreter exit can abort the process)."""
    it.close()  # sets its terminate event, seen when its queue has stayed full for 0.5 s
    while it.is_alive():
        it.join(timeout=1.0)
        try:
            it.output_queue.get_nowait()  # unblocks its final put(None), which has no timeout
        except queue.Empty:
            pass


_LIVE: "weakref.WeakSet[FFCVBatches]" = weakref.WeakSet()
atexit.register(lambda: [b.close() for b in list(_LIVE)])


def build_ffcv_loader(path, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int, start_micro_batch: int = 0, *,
                      scale=(0.2, 1.0), hflip: float = 0.5, num_workers: int = 2, mode: str = "train", **kw) -> FFCVBatches:
    """This rank's FFCV batches; ``kw``: copy, batches_ahead, accumulation, fast_idct (see FFCVBatches)."""
    return FFCVBatches(path, img_size, micro_batch, rank, world_size, seed, start_micro_batch, scale=scale,
                       hflip=hflip, num_workers=num_workers, mode=mode, **kw)

"""WebDataset shards (written by ``python -m data_prep.wds``) streamed under the loader contract.

Shards are ``<split>-NNNNNN.tar`` with members ``<key>.jpg``, ``<key>.cls``, ``<key>.json`` (the JSON
holds the global ``index``), listed with their sample counts in ``<split>-manifest.json``. Training
shards were written in a seeded random order, so every shard is a uniform sample of the dataset.

Two modes:

* ``train`` (resampled): each (rank, stream) pair reads an endless sequence of *groups*; group g is
  shards drawn with replacement by a generator keyed by (seed, rank, stream, g), read whole (about
  ``shuffle_buffer`` samples) and emitted in a seeded permutation. Any world size works: an epoch
  is defined by samples seen. The position of a stream is one integer, the records it has
  consumed; the group sizes come from the manifest, so a resumed stream finds its group and
  offset without reading any shard before it, and continues exactly where it stopped.
* ``eval`` (exactly once): shard j goes to slot j mod (world * workers), slot = rank * workers +
  worker; each slot reads its shards once, in order, and the last batch may be short. Every
  readable sample is seen exactly once across all ranks.

A "stream" is a DataLoader worker's sequence of batches. The DataLoader takes batches from its
workers round-robin, so after the trainer has consumed m batches the next one comes from worker
m mod W. A resumed loader starts with its worker 0, so worker k plays stream (k + offset) mod W
with offset = m mod W, and the interleaving of streams continues unchanged.

Each batch carries ``cursor`` = [stream, records consumed by that stream after this batch]; the
trainer keeps the latest cursor of every stream it has consumed and checkpoints them per rank.
It also carries ``shard``, the name of the shard its last sample came from (a str: batches are
yielded whole, so the DataLoader does not collate them), which a data-stall error names.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from mimscale.data import device_decode
from mimscale.data.crop import UnreadableImage, crop_bytes
from mimscale.data.eval_transform import center_crop, check_crop_pct
from mimscale.data.loader import stack_images
from mimscale.data.workers import worker_init

MANIFEST_FORMAT = "mimscale-wds/1"


@dataclass
class ShardIndex:
    """The shards of one split, from its manifest."""

    root: Path
    names: list[str]
    counts: np.ndarray  # [num_shards] int64 samples per shard
    classes: list[str]
    unlabelled: str = ""  # why the source folder had no labels (every label -1; "" when it had them)

    @classmethod
    def load(cls, path: str | Path, split: str = "train") -> "ShardIndex":
        path = Path(path)
        manifest = path if path.is_file() else path / f"{split}-manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"data.path {path}: no {manifest.name} (write shards with: "
                                    f"python -m data_prep.wds --src <ImageNet root> --split {split} --out {path})")
        m = json.loads(manifest.read_text())
        if m.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest}: format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        shards = [s for s in m["shards"] if s["count"] > 0]
        if not shards:
            raise ValueError(f"{manifest} lists no samples")
        return cls(manifest.parent, [s["name"] for s in shards], np.array([s["count"] for s in shards], dtype=np.int64), list(m.get("classes", [])),
                   str(m.get("unlabelled", "")))

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def num_shards(self) -> int:
        return len(self.names)


class TooManyBad(RuntimeError):
    """More failures in a row than data.max_bad_in_a_row: the shards are not readable (wrong
    path, a dead mount, all shards damaged) and looping over them would train on nothing forever."""


def _warn(msg: str, state: dict) -> None:
    """One failure (a shard that cannot be opened or reads short, an undecodable sample): warned
    about (the first ten per worker; the total is counted and logged by the trainer) and counted
    towards ``max_bad`` failures in a row, which end the stream with TooManyBad."""
    if state.setdefault("warned", 0) < 10:
        print(f"[mimscale.data] {msg}", file=sys.stderr)
        state["warned"] += 1
    state["in_a_row"] = state.get("in_a_row", 0) + 1
    if state["in_a_row"] > state.get("max_bad", 64):
        raise TooManyBad(f"{state['in_a_row']} unreadable shards or samples in a row (data.max_bad_in_a_row = "
                         f"{state.get('max_bad', 64)}), the last: {msg}; check data.path and the shards "
                         "(python -m data_prep.verify)")


def read_shards(index: ShardIndex, shard_ids: Sequence[int], state: dict) -> Iterator[dict]:
    """Samples {__key__, __url__, jpg, json, cls (when present)} of the given shards in order. A
    shard that reads fewer whole samples than its manifest count (a truncated or damaged tar: one
    cut at a member boundary ends early without any error from tarfile) is warned about once,
    naming it, and its missing samples are counted as bad (``state["bad"]``)."""
    for s in shard_ids:
        name = index.names[s]
        expected = int(index.counts[s])
        try:
            stream = open(index.root / name, "rb")
        except OSError as e:
            state["bad"] = state.get("bad", 0) + expected
            _warn(f"cannot open shard {index.root / name}: {e}", state)
            continue
        errors: list[str] = []

        def handler(exn: Exception, errors: list[str] = errors) -> bool:
            if isinstance(exn, TooManyBad):
                raise exn
            errors.append(str(exn.args[0]) if exn.args else type(exn).__name__)  # webdataset appends (stream, url) to args
            return True  # what was read so far is kept; the shard ends here

        got = 0
        with stream:
            samples = group_by_keys(tar_file_expander([{"url": name, "stream": stream}], handler=handler), handler=handler)
            for rec in samples:
                if "jpg" not in rec or "json" not in rec:  # the last sample of a cut tar: some members missing
                    errors.append(f"sample {rec.get('__key__')} lacks {', '.join(m for m in ('jpg', 'json') if m not in rec)}")
                    continue
                got += 1
                yield rec
        if got < expected or errors:
            state["bad"] = state.get("bad", 0) + max(1, expected - got)
            why = f" ({errors[0]})" if errors else ""
            _warn(f"shard {index.root / name}: {got} of its {expected} samples readable{why}: the file is truncated or damaged; "
                  f"check the shards with: python -m data_prep.verify {index.root}", state)


def _group(index: ShardIndex, seed: int, rank: int, stream: int, g: int, buffer: int) -> tuple[list[int], np.random.Generator]:
    """Shards of training group g of (rank, stream) and the generator that permutes its records."""
    rng = np.random.default_rng([seed, 0x3D5, rank, stream, g])
    shards, total = [], 0
    while total < buffer or not shards:
        s = int(rng.integers(index.num_shards))
        shards.append(s)
        total += int(index.counts[s])
    return shards, rng


class ShardStream(IterableDataset):
    """Yields whole micro batches (dicts under the loader contract plus ``cursor``)."""

    def __init__(self, index: ShardIndex, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 scale=(0.2, 1.0), hflip: float = 0.5, shuffle_buffer: int = 2000, mode: str = "train",
                 cursors: Optional[dict[int, int]] = None, stream_offset: int = 0, max_bad_in_a_row: int = 64,
                 crop_pct: Optional[float] = None, fast_idct: bool = True, device_decode: bool = False):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode {mode!r}: allowed values: train, eval")
        if crop_pct is not None and mode != "eval":
            raise ValueError("crop_pct (the evaluation transform) needs mode='eval'")
        self.index = index
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.scale = None if scale is None else tuple(scale)  # None: whole images (crop.py)
        # the evaluation transform (eval_transform.py) instead of a crop; None: ``scale`` decides
        self.crop_pct = None if crop_pct is None else check_crop_pct(crop_pct)
        self.hflip = hflip
        self.buffer = max(1, shuffle_buffer)
        self.mode = mode
        self.cursors = dict(cursors or {})
        self.stream_offset = stream_offset
        self.max_bad = max_bad_in_a_row
        self.fast_idct = fast_idct  # libjpeg's fast integer IDCT (data.jpeg_idct)
        # data.decode=nvjpeg: bytes and crop plans out, the device decodes (device_decode.py); training crops only
        self.device_decode = device_decode and crop_pct is None and self.scale is not None

    # ---------------------------------------------------------------- record sources
    def _train_records(self, stream: int, start: int, state: dict) -> Iterator[tuple[int, Optional[dict]]]:
        """(cursor after the record, sample) forever; skips ``start`` records using manifest counts."""
        g, consumed = 0, 0
        while True:
            shards, rng = _group(self.index, self.seed, self.rank, stream, g, self.buffer)
            size = int(self.index.counts[shards].sum())
            if consumed + size <= start:  # wholly consumed before the resume point: no I/O
                consumed += size
                g += 1
                continue
            # A damaged shard reads short (read_shards counts its missing records as bad); the group
            # still consumes ``size`` records, so the cursor stays aligned with the manifest counts
            # that a resume relies on.
            records = list(read_shards(self.index, shards, state))
            order = rng.permutation(len(records))
            skip = max(0, start - consumed)
            for j, r in enumerate(order):
                if j >= skip:
                    yield consumed + j + 1, records[r]
            consumed += size
            g += 1

    def _eval_records(self, slot: int, slots: int, state: dict) -> Iterator[tuple[int, Optional[dict]]]:
        mine = list(range(slot, self.index.num_shards, slots))
        for n, rec in enumerate(read_shards(self.index, mine, state), 1):
            yield n, rec

    # ---------------------------------------------------------------- decoding
    def _decode(self, rec: dict, key: list[int]):
        meta = json.loads(rec["json"])
        if self.crop_pct is not None:
            crop = center_crop(rec["jpg"], self.size, self.crop_pct)
        elif self.device_decode:
            crop = device_decode.plan_bytes(rec["jpg"], np.random.default_rng(key), self.size, self.scale, self.hflip, self.fast_idct)
        else:
            crop = crop_bytes(rec["jpg"], np.random.default_rng(key), self.size, self.scale, self.hflip, self.fast_idct)
        # no .cls member (shards of unlabelled images written by another tool): label -1, as data_prep writes them
        return crop, int(meta["index"]), int(rec.get("cls", b"-1"))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        state: dict = {"max_bad": self.max_bad}
        if self.mode == "train":
            stream = (worker + self.stream_offset) % workers
            records = self._train_records(stream, self.cursors.get(stream, 0), state)
        else:
            stream = self.rank * workers + worker
            records = self._eval_records(stream, self.world * workers, state)
        images, boxes, flips, idx, labels, names = [], [], [], [], [], []
        converted, reported_bad, cursor, shard = 0, 0, 0, ""
        for cursor, rec in records:
            try:
                crop, i, label = self._decode(rec, [self.seed, 0xC0, self.rank, stream, cursor])
            except (UnreadableImage, OSError, ValueError, KeyError) as e:
                state["bad"] = state.get("bad", 0) + 1
                _warn(f"skipping unreadable sample {rec.get('__key__')} in {rec.get('__url__')}: {type(e).__name__}: {e}", state)
                continue
            state["in_a_row"] = 0  # a good sample ends a run of failures
            images.append(crop if self.device_decode else torch.from_numpy(crop.image).permute(2, 0, 1))
            boxes.append(crop.box)
            flips.append(crop.flip)
            idx.append(i)
            labels.append(label)
            converted += int(crop.converted)
            shard = rec.get("__url__", "")
            names.append(f"{shard}:{rec.get('__key__')}")
            if len(images) == self.batch_size:
                yield self._batch(names, images, boxes, flips, idx, labels, state.get("bad", 0) - reported_bad, converted, stream, cursor, shard)
                reported_bad = state.get("bad", 0)
                images, boxes, flips, idx, labels, converted, names = [], [], [], [], [], 0, []
        if images:  # eval: the short last batch
            yield self._batch(names, images, boxes, flips, idx, labels, state.get("bad", 0) - reported_bad, converted, stream, cursor, shard)

    def _batch(self, names, images, boxes, flips, idx, labels, skipped, converted, stream, cursor, shard) -> dict:
        # data.decode=nvjpeg: ``images`` are Planned JPEGs and CPU crops, packed for the device
        pixels = device_decode.pack(images, names) if self.device_decode else {"image": stack_images(images)}
        return {
            **pixels,
            "box": torch.tensor(boxes, dtype=torch.float32),
            "flip": torch.tensor(flips, dtype=torch.bool),
            "index": torch.tensor(idx, dtype=torch.int64),
            "label": torch.tensor(labels, dtype=torch.int64),
            "skipped": torch.tensor(skipped, dtype=torch.int64),
            "converted": torch.tensor(converted, dtype=torch.int64),
            "cursor": torch.tensor([stream, cursor], dtype=torch.int64),
            "shard": shard,
        }


def build_wds_loader(index: ShardIndex, data_cfg, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                     start_micro_batch: int = 0, cursors: Optional[dict[int, int]] = None, pin_memory: bool = False,
                     mode: str = "train") -> DataLoader:
    """The DataLoader of this rank. ``cursors`` (stream -> records consumed) and
    ``start_micro_batch`` (batches this rank has consumed) position a resumed training stream."""
    workers = data_cfg.num_workers
    dataset = ShardStream(index, img_size, micro_batch, rank, world_size, seed, (data_cfg.scale_min, data_cfg.scale_max),
                          data_cfg.hflip if mode == "train" else 0.0, data_cfg.shuffle_buffer, mode, cursors,
                          stream_offset=start_micro_batch % max(1, workers), max_bad_in_a_row=data_cfg.max_bad_in_a_row,
                          fast_idct=data_cfg.jpeg_idct == "fast", device_decode=data_cfg.decode == "nvjpeg")
    # A generator of its own: starting the iterator must not draw from the global torch RNG,
    # which masking uses and a resumed run restores.
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed))


def whole_image_stream(index: ShardIndex, img_size: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                       num_workers: int = 0, crop_pct: Optional[float] = None) -> DataLoader:
    """This rank's share of one full pass (see mimscale/data/full_pass.py): eval mode, each shard
    read once by one (rank, worker) slot, no flip; ``crop_pct`` None: whole images resized to
    img_size (AMT), else the evaluation transform (mimscale/data/eval_transform.py)."""
    stream = ShardStream(index, img_size, batch_size, rank, world_size, seed, scale=None, hflip=0.0, mode="eval",
                         crop_pct=crop_pct)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, worker_init_fn=worker_init if num_workers else None,
                      generator=torch.Generator().manual_seed(seed))

"""One entry point from ``data.source`` to what the trainer iterates.

Every source yields batches under the loader contract (see ``mimscale.data.loader``). Sources
whose position is more than "micro batches consumed" (the WebDataset streams) also put a
``cursor`` [stream, records consumed] in each batch; ``StreamPosition`` collects them so a
checkpoint can record where each stream of this rank stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional


@dataclass
class FfcvFile:
    """A .beton written by ``python -m data_prep.ffcv`` (fields image, label, index)."""

    path: Path
    num_samples: int

    @classmethod
    def open(cls, path: str | Path) -> "FfcvFile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path {path} is not an FFCV file (write one with: python -m data_prep.ffcv --src <ImageNet root> --out {path})")
        from ffcv.reader import Reader  # imported here: numba start-up only when FFCV is used

        reader = Reader(str(path))
        missing = {"image", "label", "index"} - set(reader.field_names)
        if missing:
            raise ValueError(f"{path}: fields {reader.field_names}, missing {sorted(missing)} (expected image, label, index)")
        return cls(path, int(reader.num_samples))

    def __len__(self) -> int:
        return self.num_samples


@dataclass
class StreamPosition:
    """Per-rank data position beyond the micro-batch count: the record cursor of each
    WebDataset stream (DataLoader worker), and how many workers produced them."""

    workers: int
    cursors: dict[int, int] = field(default_factory=dict)

    def observe(self, batch: dict) -> None:
        cursor = batch.pop("cursor", None)  # not part of the contract the model sees
        if cursor is not None:
            self.cursors[int(cursor[0])] = int(cursor[1])

    def state(self) -> dict:
        return {"workers": self.workers, "cursors": dict(self.cursors)}

    @classmethod
    def restore(cls, state: Optional[dict], workers: int) -> tuple["StreamPosition", Optional[str]]:
        """(position, warning): cursors only carry over when the worker count is unchanged,
        since stream k is worker k's."""
        if not state or not state.get("cursors"):
            return cls(workers), None
        if int(state.get("workers", -1)) != workers:
            return cls(workers), (f"data.num_workers changed from {state.get('workers')} to {workers}: "
                                  "the WebDataset streams restart from new random positions")
        return cls(workers, {int(k): int(v) for k, v in state["cursors"].items()}), None


def build_source(data_cfg, seed: int = 0):
    """The indexable/countable source behind ``data.source`` (len() = samples per epoch)."""
    from mimscale.data.sources import FolderSource, SyntheticSource

    if data_cfg.source == "synthetic":
        return SyntheticSource(data_cfg.synthetic_count, data_cfg.synthetic_size, seed=1234 + seed)
    if data_cfg.source == "folder":
        return FolderSource(data_cfg.path, data_cfg.split)
    if data_cfg.source == "wds":
        from mimscale.data.wds_loader import ShardIndex

        return ShardIndex.load(data_cfg.path, data_cfg.split)
    if data_cfg.source == "ffcv":
        return FfcvFile.open(data_cfg.path)
    raise ValueError(f"data.source {data_cfg.source!r}: allowed values: synthetic, folder, wds, ffcv")


def open_stream(data_cfg, source, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                start_micro_batch: int = 0, position: Optional[StreamPosition] = None, pin_memory: bool = False) -> Iterable[dict]:
    """This rank's endless training stream of micro batches, starting after ``start_micro_batch``
    consumed batches (and, for WebDataset, at ``position``'s record cursors)."""
    if data_cfg.source == "wds":
        from mimscale.data.wds_loader import build_wds_loader

        if position is not None and not position.cursors and start_micro_batch:
            # A checkpoint without cursors (another source, or another worker count): new streams,
            # keyed away from the ones a fresh run reads so no data is replayed in order.
            seed = seed + 7919 * start_micro_batch
        return build_wds_loader(source, data_cfg, img_size, micro_batch, rank, world_size, seed, start_micro_batch,
                                position.cursors if position else None, pin_memory)
    if data_cfg.source == "ffcv":
        from mimscale.data.ffcv_loader import build_ffcv_loader

        return build_ffcv_loader(str(source.path), img_size, micro_batch, rank, world_size, seed, start_micro_batch,
                                 scale=(data_cfg.scale_min, data_cfg.scale_max), hflip=data_cfg.hflip,
                                 num_workers=max(1, data_cfg.num_workers), mode="train")
    from mimscale.data.loader import build_loader

    loader, _ = build_loader(data_cfg, img_size, micro_batch, rank, world_size, seed, start_micro_batch, pin_memory, source)
    return loader

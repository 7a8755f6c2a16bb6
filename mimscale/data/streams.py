"""The one dispatcher from ``data.source`` to what callers iterate: the source, the training
stream, and the whole-image pass. Nothing else in mimscale.data names the source kinds.

Every source yields batches under the loader contract (see ``mimscale.data.loader``). Sources
whose position is more than "micro batches consumed" (the WebDataset streams) also put a
``cursor`` [stream, records consumed] and ``shard`` (a name) in each batch; ``StreamPosition``
collects the cursors so a checkpoint can record where each stream of this rank stopped.

Imports inside mimscale.data point down only (no cycle, none hidden in a function):

    streams -> describe   (a run's data identity, checked on a resume)
            -> loader     -> sampler, workers, sources -> imagenet, crop
            -> full_pass  -> workers, sources, crop, eval_transform -> crop
            -> wds_loader -> workers, crop, eval_transform
            -> ffcv_loader -> sampler, ffcv_decode     (imported in ``_ffcv_loader``, see there)
    normalize (device side) and imagenet (the listing) import no other mimscale module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from mimscale.data.describe import identity
from mimscale.data.full_pass import whole_image_loader
from mimscale.data.loader import build_loader
from mimscale.data.sources import FfcvFile, indexed_source
from mimscale.data.wds_loader import ShardIndex, build_wds_loader, whole_image_stream
from mimscale.errors import ConfigError
from mimscale.runtime import dist
from mimscale.runtime.stateful import Stateful

SOURCES = ("synthetic", "folder", "wds", "ffcv")


@dataclass
class StreamPosition(Stateful):
    """Per-rank data position beyond the micro-batch count: the record cursor of each
    WebDataset stream (DataLoader worker), and how many workers produced them (this rank's part,
    ``rank_state_dict``); and the identity of the data read (``state_dict``, the same on every
    rank: describe.identity), which ``check_dataset`` compares on a resume."""

    workers: int
    cursors: dict[int, int] = field(default_factory=dict)
    dataset: Optional[dict] = None  # this run's data (set when its stream opens)
    saved_dataset: Optional[dict] = None  # the checkpoint's (None: a fresh run, or a checkpoint without one)

    def state_dict(self) -> dict:
        held = self.dataset or self.saved_dataset
        return {"dataset": dict(held)} if held else {}

    def load_state_dict(self, state: dict) -> None:
        self.saved_dataset = dict(state["dataset"]) if state and state.get("dataset") else None

    def check_dataset(self, current: dict, policy: str = "refuse") -> Optional[str]:
        """Record ``current`` as this run's data; on a resume whose checkpoint read other data
        (another count or digest from the same kind of source) raise a ConfigError naming both
        counts, or with ``policy`` "allow" return the warning (also logged). A change of
        data.source itself was already allowed as a config change (resume_changes=allow)."""
        self.dataset = dict(current)
        old = self.saved_dataset
        if not old or old.get("source") != current["source"]:
            return None
        if old.get("count") == current["count"] and old.get("sha256") == current["sha256"]:
            return None
        what = (f"{old.get('count')} samples when the checkpoint was written, {current['count']} now" if old.get("count") != current["count"]
                else f"{current['count']} samples as before")
        msg = (f"the data at data.path {current['path']} changed since the checkpoint ({what}; the {current['source']} "
               f"fingerprint differs: {str(old.get('sha256'))[:16]} then, {current['sha256'][:16]} now), so the sampler's order and "
               "an exact resume no longer hold")
        if policy != "allow":
            raise ConfigError(f"{msg}. Restore the data, start a new output_dir, or continue on the new data with "
                              "--set data.resume_changes=allow")
        warning = f"{msg}: continuing on the new data (data.resume_changes=allow)"
        dist.log0(f"[mimscale] WARNING: {warning}")
        return warning

    def observe(self, batch: dict) -> None:
        cursor = batch.pop("cursor", None)  # not part of the contract the model sees
        batch.pop("shard", None)  # read by the data-stall watch before this
        if cursor is not None:
            self.cursors[int(cursor[0])] = int(cursor[1])

    def state(self) -> dict:
        return {"workers": self.workers, "cursors": dict(self.cursors)}

    def rank_state_dict(self) -> dict:
        return self.state()

    def load_rank_state_dict(self, state: dict) -> None:
        restored, warning = self.restore(state, self.workers)
        self.cursors = restored.cursors
        if warning:
            dist.log0(f"[mimscale] {warning}")

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


def _ffcv_loader():
    """The FFCV reader module, imported on first use: importing it starts numba (seconds) and
    needs the optional ``[ffcv]`` extra, which a run on any other source must not pay for."""
    from mimscale.data import ffcv_loader

    return ffcv_loader


def build_source(data_cfg, seed: int = 0):
    """The indexable/countable source behind ``data.source`` (len() = samples per epoch)."""
    if data_cfg.source in ("synthetic", "folder"):
        return indexed_source(data_cfg, seed)
    if data_cfg.source == "wds":
        return ShardIndex.load(data_cfg.path, data_cfg.split)
    if data_cfg.source == "ffcv":
        return FfcvFile.open(data_cfg.path)
    raise ValueError(f"data.source {data_cfg.source!r}: allowed values: {', '.join(SOURCES)}")


def open_stream(data_cfg, source, *, img_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                start_micro_batch: int = 0, position: Optional[StreamPosition] = None, pin_memory: bool = False,
                accumulation: int = 1) -> Iterable[dict]:
    """This rank's endless training stream of micro batches, starting after ``start_micro_batch``
    consumed batches (and, for WebDataset, at ``position``'s record cursors). Folder, synthetic and
    FFCV deal global batches of micro x ``accumulation`` x world, the same on any world size;
    WebDataset streams are per rank by design. With a ``position``, the data's identity is checked
    against the one its checkpoint recorded (``StreamPosition.check_dataset``, data.resume_changes)."""
    if position is not None:
        position.check_dataset(identity(data_cfg, source), data_cfg.resume_changes)
    if data_cfg.source == "wds":
        if position is not None and not position.cursors and start_micro_batch:
            # A checkpoint without cursors (another source, worker count or world size): new streams,
            # keyed away from the ones a fresh run reads so no data is replayed in order.
            seed = seed + 7919 * start_micro_batch
            dist.log0("[mimscale] WebDataset: no stream positions for this layout (another world size or worker count): "
                      "the streams restart from new positions; this epoch's 'each sample once' no longer holds across the change")
        return build_wds_loader(source, data_cfg, img_size, micro_batch, rank, world_size, seed, start_micro_batch,
                                position.cursors if position else None, pin_memory)
    if data_cfg.source == "ffcv":
        ffcv = _ffcv_loader()
        return ffcv.build_ffcv_loader(str(source.path), img_size, micro_batch, rank, world_size, seed, start_micro_batch,
                                      scale=(data_cfg.scale_min, data_cfg.scale_max), hflip=data_cfg.hflip,
                                      num_workers=max(1, data_cfg.num_workers), mode="train", accumulation=accumulation,
                                      fast_idct=data_cfg.jpeg_idct == "fast")
    loader, _ = build_loader(data_cfg, img_size=img_size, micro_batch=micro_batch,
                             rank=rank, world_size=world_size, seed=seed, start_micro_batch=start_micro_batch, pin_memory=pin_memory, source=source,
                             accumulation=accumulation)
    return loader


def open_full_pass(data_cfg, source, *, img_size: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                   crop_pct: Optional[float] = None) -> Iterable[dict]:
    """This rank's share of one full pass (batches and shares: see ``mimscale.data.full_pass``).
    ``crop_pct`` None: whole images resized to S x S (AMT's refresh); a float: the evaluation
    transform of ``mimscale.data.eval_transform`` (every evaluation caller passes one)."""
    workers = data_cfg.num_workers
    if data_cfg.source == "wds":
        return whole_image_stream(source, img_size, batch_size, rank, world_size, seed, workers, crop_pct)
    if data_cfg.source == "ffcv" and crop_pct is not None:
        # FFCV's pipeline resizes with OpenCV's INTER_AREA on a box, not PIL's bicubic: the eval pass
        # reads the .beton's stored bytes itself and applies eval_transform after the decode.
        return whole_image_loader(source, img_size, batch_size, rank, world_size, seed, workers, crop_pct)
    if data_cfg.source == "ffcv":
        ffcv = _ffcv_loader()
        return ffcv.build_ffcv_loader(str(source.path), img_size, batch_size, rank, world_size, seed, scale=None,
                                      num_workers=max(1, workers), mode="eval")
    return whole_image_loader(source, img_size, batch_size, rank, world_size, seed, workers, crop_pct)

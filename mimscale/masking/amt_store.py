"""AMT's attention store: one float16 map per training sample, in a memory-mapped file.

Layout under ``<output_dir>/amt/``, one pair of files per refresh ("generation" g = 1, 2, ...):
  maps-000g.f16   raw float16 [N, L + 1]: row i = sample i's L patch weights, then the generation
                  that wrote the row (small integers are exact in float16; 0 = never written)
  maps-000g.json  written by rank 0 after every rank has flushed its rows: marks g complete
                  (generation, step, epoch, num_samples, num_patches, rows_written, seconds)
The file lives in the page cache, shared by all ranks of a node, instead of in every rank's RAM
(ImageNet at 14 x 14 patches: 1.28M x 197 x 2 bytes = 505 MB). Ranks on several nodes need
output_dir on storage they all see (as DeepSpeed checkpoints do); ``verify_rows`` checks it.

A generation is kept while the current run or a checkpoint on disk refers to it, so resuming
from an older checkpoint finds the maps it trained with.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

NAME_RE = re.compile(r"^maps-(\d{4,})\.(f16|json)$")


def store_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "amt"


class AttentionStore:
    """One generation's maps. ``create`` (rank 0) sizes the file, ``open`` maps it on any rank."""

    def __init__(self, path: Path, num_samples: int, num_patches: int, generation: int, writable: bool):
        self.path = path
        self.num_samples = num_samples
        self.num_patches = num_patches
        self.generation = generation
        shape = (num_samples, num_patches + 1)
        self.rows = np.memmap(path, dtype=np.float16, mode="r+" if writable else "r", shape=shape)

    @staticmethod
    def paths(output_dir: str | Path, generation: int) -> tuple[Path, Path]:
        base = store_dir(output_dir) / f"maps-{generation:04d}"
        return base.with_suffix(".f16"), base.with_suffix(".json")

    @classmethod
    def create(cls, output_dir: str | Path, generation: int, num_samples: int, num_patches: int) -> None:
        """Make (or remake, when a refresh is redone after a resume) an all-zero file: sparse, so
        creating it costs nothing until rows are written."""
        data, marker = cls.paths(output_dir, generation)
        data.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        with open(data, "wb") as f:
            f.truncate(num_samples * (num_patches + 1) * 2)

    @classmethod
    def open(cls, output_dir: str | Path, generation: int, num_samples: int, num_patches: int, writable: bool = False) -> "AttentionStore":
        data, _ = cls.paths(output_dir, generation)
        expected = num_samples * (num_patches + 1) * 2
        if not data.is_file() or data.stat().st_size != expected:
            size = data.stat().st_size if data.is_file() else "missing"
            raise FileNotFoundError(f"AMT store {data}: expected {expected} bytes ({num_samples} samples x {num_patches} patches), found {size}")
        return cls(data, num_samples, num_patches, generation, writable)

    @classmethod
    def complete(cls, output_dir: str | Path, generation: int) -> Optional[dict]:
        """The marker of a complete generation, or None."""
        _, marker = cls.paths(output_dir, generation)
        return json.loads(marker.read_text()) if marker.is_file() else None

    @classmethod
    def mark_complete(cls, output_dir: str | Path, generation: int, info: dict) -> None:
        _, marker = cls.paths(output_dir, generation)
        tmp = marker.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"generation": generation, **info}, indent=1))
        tmp.replace(marker)

    def write(self, index: torch.Tensor, maps: torch.Tensor) -> None:
        """index [B] int64, maps [B, L] float -> rows ``index`` (with this generation's tag)."""
        rows = np.empty((len(index), self.num_patches + 1), dtype=np.float16)
        rows[:, :-1] = maps.detach().to("cpu", torch.float32).numpy()
        rows[:, -1] = self.generation
        self.rows[index.cpu().numpy()] = rows

    def flush(self) -> None:
        self.rows.flush()

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """index [B] int64 (CPU) -> maps [B, L] float16 (CPU; a copy, safe to pin and move)."""
        return torch.from_numpy(np.ascontiguousarray(self.rows[index.numpy(), :-1]))

    def generations_of(self, index: Iterable[int]) -> list[int]:
        return [int(self.rows[i, -1]) for i in index]

    def close(self) -> None:
        del self.rows


def prune(output_dir: str | Path, keep: set[int]) -> list[int]:
    """Delete the generations not in ``keep``; returns the deleted ones."""
    gone = set()
    root = store_dir(output_dir)
    if not root.is_dir():
        return []
    for p in root.iterdir():
        m = NAME_RE.match(p.name)
        if m and int(m.group(1)) not in keep:
            p.unlink(missing_ok=True)
            gone.add(int(m.group(1)))
    return sorted(gone)

"""Where samples come from: an ImageNet-layout folder, or generated images.

A source is indexable by a global sample index (0..N-1, stable across runs and world sizes) and
returns either encoded bytes (``read``) or, for synthetic data, an RGB array (``array``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class FolderSource:
    """``<root>/<split>/<class>/*.JPEG`` (or ``<root>/<class>/*.JPEG``); classes in sorted order,
    files sorted within a class, so global indices are the same on every rank and every run."""

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        base = root / split if (root / split).is_dir() else root
        if not base.is_dir():
            raise FileNotFoundError(f"data.path {root} is not a folder")
        self.root = base
        self.classes = sorted(e.name for e in os.scandir(base) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"data.path {base} holds no class folders (expected <class>/<image> files)")
        files: list[str] = []
        labels: list[int] = []
        for ci, c in enumerate(self.classes):
            names = sorted(e.name for e in os.scandir(base / c) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
            files.extend(f"{c}/{n}" for n in names)
            labels.extend([ci] * len(names))
        if not files:
            raise FileNotFoundError(f"data.path {base} holds no images with extensions {IMAGE_EXTS}")
        # One fixed-width bytes array, not a list of str: forked DataLoader workers touching
        # 1.28M Python objects' refcounts would copy the list's pages into every worker.
        self._files = np.array([f.encode() for f in files], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def files(self) -> list[str]:
        """Relative paths ``<class>/<file>`` in index order (a fresh list: for inspection)."""
        return [f.decode() for f in self._files]

    def __len__(self) -> int:
        return len(self._files)

    def relpath(self, index: int) -> str:
        return self._files[index].decode()

    def name(self, index: int) -> str:
        return str(self.root / self.relpath(index))

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def read(self, index: int) -> bytes:
        with open(self.root / self.relpath(index), "rb") as f:
            return f.read()


class SyntheticSource:
    """Deterministic smooth random RGB images (upsampled 8x8 noise): cheap to make, and structured
    enough that a masked autoencoder's loss visibly falls on them."""

    def __init__(self, count: int, size: int = 256, seed: int = 1234):
        self.count = count
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"synthetic:{index}"

    def label(self, index: int) -> int:
        return index % 10

    def array(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((self.size, self.size), Image.BICUBIC))

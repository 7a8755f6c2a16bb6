"""Where samples come from: an ImageNet-layout folder, generated images, or an FFCV file.

Folder and synthetic sources are indexable by a global sample index (0..N-1, stable across runs
and world sizes) and return either encoded bytes (``read``) or, for synthetic data, an RGB array
(``array``). ``FfcvFile`` counts its samples for FFCV's own loader (training, AMT's whole-image
pass), and reads them one by one for the evaluation pass (``read``: the stored JPEG bytes or raw
pixels, which ``mimscale.data.eval_transform`` resizes and crops). (The WebDataset source,
``ShardIndex``, lives with its reader in wds_loader.py.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mimscale.data.imagenet import LayoutError, Listing, list_folder, listing_fingerprint
from mimscale.errors import ConfigError


class DataPathLayoutError(LayoutError, ConfigError):
    """data.path is no folder layout the listing reads: a LayoutError that also ends a run as a
    configuration error (exit code 2, no traceback)."""


class FolderSource:
    """``<root>/<split>/<class>/*.JPEG`` (or ``<root>/<class>/*.JPEG``), or a folder of unlabelled
    images at any depth (label -1), listed by ``mimscale.data.imagenet`` (classes in synsets.txt
    order, else sorted; files sorted within a class; unlabelled: by relative path), so global
    indices are the same on every rank, every run and in every converted format."""

    def __init__(self, root: str | Path, split: str = "train"):
        try:
            listing = list_folder(root, split)
        except LayoutError as e:
            raise DataPathLayoutError(f"data.path: {e}") from None  # names the setting to fix
        self._adopt(listing)

    @classmethod
    def from_listing(cls, listing: Listing) -> "FolderSource":
        """A source over a listing already made (e.g. by ``list_split``)."""
        self = cls.__new__(cls)
        self._adopt(listing)
        return self

    def _adopt(self, listing: Listing) -> None:
        self.root = listing.split_dir
        self.classes = list(listing.classes)
        # One fixed-width bytes array, not a list of str: forked DataLoader workers touching
        # 1.28M Python objects' refcounts would copy the list's pages into every worker.
        self._files = np.array([f.encode() for f in listing.files], dtype=np.bytes_)
        self.labels = np.asarray(listing.labels, dtype=np.int64)
        self.unlabelled = listing.unlabelled  # why there are no labels ("" when there are)
        self._fingerprint = None

    @property
    def files(self) -> list[str]:
        """Relative paths (``<class>/<file>``) in index order (a fresh list: for inspection)."""
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

    def fingerprint(self) -> str:
        """The listing's sha256, as ``Listing.fingerprint`` (and data_prep's manifests) compute it
        (once: a second of hashing for ImageNet's 1.28M names)."""
        if self._fingerprint is None:
            self._fingerprint = listing_fingerprint(self.files, self.labels)
        return self._fingerprint


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


@dataclass
class FfcvFile:
    """A .beton written by ``python -m data_prep.ffcv`` (fields image, label, index).

    Indexable by .beton position (0..N-1) for the evaluation pass: ``read(pos)`` gives the stored
    image (JPEG bytes, or raw pixels [H, W, 3] uint8 for a raw-mode sample), ``label(pos)`` and
    ``global_index(pos)`` (the ``index`` field: the sample's global index, which differs from the
    position when data_prep left a bad file out). The tables and the file's memory map are built
    on first use, in the process that reads (a DataLoader worker)."""

    path: Path
    num_samples: int
    _tables: dict = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> "FfcvFile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path {path} is not an FFCV file (write one with: python -m data_prep.ffcv --src <ImageNet root> --out {path})")
        problem = beton_problem(path)
        if problem:
            raise CorruptDataFile(corrupt_beton_message(path, problem))
        from ffcv.reader import Reader  # imported here: numba start-up only when FFCV is used

        try:
            reader = Reader(str(path))
        except (ValueError, IndexError, KeyError, AssertionError, OSError) as e:  # what FFCV's reader raises on bad bytes
            raise CorruptDataFile(corrupt_beton_message(path, f"ffcv.reader.Reader: {type(e).__name__}: {e}")) from None
        missing = {"image", "label", "index"} - set(reader.field_names)
        if missing:
            raise ValueError(f"{path}: fields {reader.field_names}, missing {sorted(missing)} (expected image, label, index)")
        return cls(path, int(reader.num_samples))

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict:  # a memory map does not travel to a spawned worker: it rebuilds its own
        return {"path": self.path, "num_samples": self.num_samples, "_tables": None}

    def _read_tables(self) -> dict:
        if self._tables is None:
            from ffcv.reader import Reader

            reader = Reader(str(self.path))
            meta, names = reader.metadata, reader.field_names
            image = meta[f"f{names.index('image')}"]  # (mode, width, height, data_ptr) per position
            alloc = reader.alloc_table  # (sample_id, ptr, size) of every stored region
            order = np.argsort(alloc["ptr"])
            self._tables = {
                "mode": np.asarray(image["mode"]), "width": np.asarray(image["width"]),
                "height": np.asarray(image["height"]), "ptr": np.asarray(image["data_ptr"]),
                "label": np.asarray(meta[f"f{names.index('label')}"], dtype=np.int64),
                "index": np.asarray(meta[f"f{names.index('index')}"], dtype=np.int64),
                "ptrs": np.asarray(alloc["ptr"][order]), "sizes": np.asarray(alloc["size"][order]),
                "file": np.memmap(self.path, dtype=np.uint8, mode="r"),
            }
        return self._tables

    def name(self, pos: int) -> str:
        return f"{self.path}:{pos}"

    def label(self, pos: int) -> int:
        return int(self._read_tables()["label"][pos])

    def unlabelled(self) -> bool:
        """Whether every label is -1 (data_prep.ffcv over an unlabelled folder)."""
        return self.num_samples > 0 and bool((self._read_tables()["label"] < 0).all())

    def global_index(self, pos: int) -> int:
        return int(self._read_tables()["index"][pos])

    def read(self, pos: int):
        """The stored image of position ``pos``: JPEG bytes (FFCV's mode jpg), or pixels [H, W, 3]
        uint8 (mode raw). A region's size is found as FFCV's own reader finds it: the allocation
        whose pointer is the sample's data pointer."""
        t = self._read_tables()
        ptr = int(t["ptr"][pos])
        at = int(np.searchsorted(t["ptrs"], ptr))
        if at >= len(t["ptrs"]) or int(t["ptrs"][at]) != ptr:
            raise OSError(f"{self.path}: position {pos} points at {ptr}, which no allocation starts at (a damaged .beton)")
        data = t["file"][ptr:ptr + int(t["sizes"][at])]
        if int(t["mode"][pos]) == _FFCV_RAW:
            h, w = int(t["height"][pos]), int(t["width"][pos])
            return np.array(data[:h * w * 3]).reshape(h, w, 3)
        return data.tobytes()


class CorruptDataFile(ConfigError):
    """A data file that cannot be read as a whole (a truncated or damaged .beton): a rerun would
    fail the same way, so it ends a run like a configuration error (exit code 2)."""


# The fixed start of a .beton (FFCV 1.x, format version 2; little-endian as ffcv.types writes it): the
# header, then num_fields field descriptors of 1041 bytes, then the per-sample metadata, the data
# pages, and the allocation table (sample_id, ptr, size: 3 x u8) from alloc_table_ptr to the end.
_BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                          ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_BETON_VERSION = 2
_BETON_FIELD_DESC = 1041  # ffcv.types.FieldDescType.itemsize (type_id u1, name u1[16], arguments u1[1024])
_BETON_ALLOC_ENTRY = 24


def beton_problem(path: str | Path, sidecar: bool = True) -> str | None:
    """Why ``path`` is not a whole .beton, or None. Reads the header and the allocation table
    only (no FFCV import, no image): a truncated file loses its allocation table (written last),
    which FFCV's reader turns into "negative dimensions are not allowed" or silently shorter
    tables. ``sidecar``: also compare the size with the ``<file>.json`` that data_prep.ffcv writes
    beside it, where present (the exact size)."""
    path = Path(path)
    size = path.stat().st_size
    side = path.with_name(path.name + ".json")
    if sidecar and side.is_file():
        try:
            expected = int(json.loads(side.read_text()).get("bytes", -1))
        except (ValueError, TypeError, AttributeError):
            expected = -1
        if expected >= 0 and expected != size:
            return f"{size} bytes, but {side.name} says {expected}" + (" (truncated)" if size < expected else "")
    if size < _BETON_HEADER.itemsize:
        return f"{size} bytes, shorter than the {_BETON_HEADER.itemsize}-byte header (truncated)"
    head = np.fromfile(path, dtype=_BETON_HEADER, count=1)[0]
    if int(head["version"]) != _BETON_VERSION:
        return f"format version {int(head['version'])} in the header, expected {_BETON_VERSION} (not a .beton, or a damaged one)"
    table_at = int(head["alloc_table_ptr"])
    if table_at > size:
        return f"{size} bytes, but its allocation table starts at byte {table_at} (truncated)"
    if (size - table_at) % _BETON_ALLOC_ENTRY:
        return f"its allocation table ({size - table_at} bytes from byte {table_at}) is not whole entries (truncated)"
    fixed = _BETON_HEADER.itemsize + int(head["num_fields"]) * _BETON_FIELD_DESC
    if table_at < fixed:
        return f"its allocation table starts at byte {table_at}, inside the header (damaged)"
    table = np.fromfile(path, dtype=np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")]), offset=table_at)
    if len(table) < int(head["num_samples"]):  # one allocation per sample's image (the only variable-size field)
        return f"its allocation table holds {len(table)} entries for {int(head['num_samples'])} samples (truncated)"
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        return "an allocation runs past the start of the allocation table (damaged)"
    return None


def corrupt_beton_message(path: Path, problem: str) -> str:
    return (f"data.path {path} is a truncated or corrupt FFCV file: {problem}. Check it with: python -m data_prep.verify {path} "
            f"(then rewrite it with python -m data_prep.ffcv, or copy it again)")


_FFCV_RAW = 1  # ffcv.fields.rgb_image.IMAGE_MODES["raw"] (jpg is 0), kept here so reading needs no numba import


def indexed_source(data_cfg, seed: int = 0):
    """The indexable source of ``data.source`` synthetic or folder (the ones CropDataset and the
    whole-image pass read by index); len() = samples per epoch."""
    if data_cfg.source == "synthetic":
        return SyntheticSource(data_cfg.synthetic_count, data_cfg.synthetic_size, seed=1234 + seed)
    if data_cfg.source == "folder":
        return FolderSource(data_cfg.path, data_cfg.split)
    raise ValueError(f"data.source {data_cfg.source!r} is not an indexable source (synthetic, folder): "
                     "use mimscale.data.streams.build_source")

"""The one listing of an ImageNet-layout folder: which files, in which global order, with which labels.

Every reader of image folders goes through it (the trainer's folder source, data_prep's WebDataset
and FFCV writers, evaluation), so a global sample index means the same file everywhere.

Layouts read (``<root>`` is the folder given, ``<split>`` is ``train``, ``val``, ...):

- foldered: ``<root>/<split>/<wnid>/<file>`` (``train`` always; ``val`` when it has subfolders).
- flat val: ``<root>/val/<file>`` plus a ground-truth CSV, looked for as
  ``LOC_val_solution.csv`` in ``<root>/val`` then ``<root>``, then any other ``*.csv`` there.
  Two CSV forms are recognised by their header: Kaggle's ``ImageId,PredictionString`` (ImageId
  without extension; the first token of PredictionString is the wnid) and a 2-column
  ``file,wnid`` CSV (file with or without its extension).
- class folders (``list_folder`` only, when ``<root>/<split>`` is not a folder): ``<root>/<class>/<file>``.
- unlabelled: images nested at any depth (some more than one folder down), or directly in the
  folder with no ground-truth CSV: every image under it (symlinked folders followed), sorted by
  relative path, label -1, no classes. Class folders are recognised only when every image in a
  subfolder sits exactly one folder down (images directly beside class folders are not samples);
  a deeper tree is listed whole, unlabelled, rather than partly ignored. Pretraining needs no
  labels; evaluation and anything else that does calls ``Listing.require_labels``.

Image files are those whose lower-cased name ends in one of ``IMAGE_EXTS``.

Classes: the lines of ``<root>/synsets.txt`` (``wnid<TAB>name`` or ``wnid name``) in order, which
for ImageNet is the sorted wnid order; without it, the sorted wnids of ``train/`` (or of the
split's own folders, or of the val CSV, when there is no ``train/``). A class folder without
images keeps its class index. A wnid outside the class list is an error naming it.

Global sample index: position in the listing sorted by (class folder, file name) for foldered
layouts, by file name for flat val, by relative path for unlabelled folders. synsets.txt changes
labels, never the order.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
KAGGLE_CSV = "LOC_val_solution.csv"
_FILE_COLS = ("file", "filename", "file_name", "path", "image", "imageid", "image_id", "name")
_WNID_COLS = ("wnid", "synset", "class", "label")


# Folder names that mark a dataset root's splits (ImageNet's train/val, and test)
SPLIT_NAMES = ("train", "val", "test")


class LayoutError(ValueError):
    """The folder is not an ImageNet layout we can read; the message says what was expected."""


@dataclass
class Listing:
    split_dir: Path  # the folder the files are relative to
    split: str
    classes: list[str]  # wnids in class-index order
    files: list[str]  # paths relative to split_dir, in global-index order
    labels: np.ndarray  # [N] int64 class index per file; -1 for every file of an unlabelled folder
    unlabelled: str = ""  # why the folder has no labels (empty when it has them)

    def __len__(self) -> int:
        return len(self.files)

    def wnid(self, index: int) -> str | None:
        """The class name of file ``index``; None in an unlabelled folder."""
        label = int(self.labels[index])
        return self.classes[label] if label >= 0 else None

    def require_labels(self, what: str) -> None:
        """A LayoutError saying that ``what`` (e.g. "evaluation") needs labels this folder lacks."""
        if self.unlabelled:
            raise LayoutError(f"{what} needs labelled images, and {self.split_dir} is unlabelled: {self.unlabelled}. "
                              f"Expected {self.split_dir}/<class>/<image> files, or a flat folder of images with a ground-truth "
                              f"CSV ({KAGGLE_CSV}, or 'file,wnid')")

    def read(self, index: int) -> bytes:
        with open(self.split_dir / self.files[index], "rb") as f:
            return f.read()

    def fingerprint(self) -> str:
        """sha256 of the (file, label) list: tells a rerun whether the source is the same one."""
        return listing_fingerprint(self.files, self.labels)


def listing_fingerprint(files, labels) -> str:
    """sha256 of ``<file>\t<label>\n`` over a listing in index order (files: relative paths)."""
    h = hashlib.sha256()
    for f, lab in zip(files, np.asarray(labels).tolist()):
        h.update(f"{f}\t{lab}\n".encode())
    return h.hexdigest()


def _images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))


def _subdirs(folder: Path) -> list[str]:
    # sorted: os.scandir's order is the filesystem's (hash order on ext4), not stable across copies
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def read_synsets(root: Path) -> list[str] | None:
    """The wnids of ``<root>/synsets.txt`` in line order, or None when there is no such file."""
    path = Path(root) / "synsets.txt"
    if not path.is_file():
        return None
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise LayoutError(f"{path} lists a wnid twice")
    return wnids


def _labeler(classes: list[str]):
    """wnid -> class index; a wnid outside the class list is an error naming it and where it is."""
    index = {w: i for i, w in enumerate(classes)}

    def label(wnid: str, where: str) -> int:
        if wnid not in index:
            raise LayoutError(f"wnid {wnid!r} ({where}) is not in the class list ({len(classes)} classes)")
        return index[wnid]

    return label


def find_val_csv(root: Path) -> tuple[Path, str] | None:
    """(path, kind) of the first recognised ground-truth CSV, kind "kaggle" or "simple"."""
    candidates = []
    for d in (root / "val", root):
        candidates.append(d / KAGGLE_CSV)
        if d.is_dir():
            candidates.extend(sorted(p for p in d.glob("*.csv") if p.name != KAGGLE_CSV))
    for path in candidates:
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            header = [c.strip().lower() for c in next(csv.reader(f), [])]
        if header[:2] == ["imageid", "predictionstring"]:
            return path, "kaggle"
        if len(header) == 2 and header[0] in _FILE_COLS and header[1] in _WNID_COLS:
            return path, "simple"
    return None


def _read_val_csv(path: Path, kind: str) -> dict[str, str]:
    """file name or stem -> wnid."""
    out = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            if not row:
                continue
            name = row[0].strip()
            wnid = row[1].split()[0] if kind == "kaggle" else row[1].strip()
            out[name] = wnid
    return out


def _list(root: Path, split_dir: Path, split: str) -> Listing:
    """The files under ``split_dir`` (class folders, else flat with a CSV); synsets.txt, train/
    and the CSV are looked for from ``root``."""
    tree = _Tree.scan(split_dir)
    if tree.unlabelled_reason is not None:
        return _unlabelled(split_dir, split, tree, tree.unlabelled_reason)
    synsets = read_synsets(root)
    folders = _subdirs(split_dir)
    if folders and (tree.nested or not tree.top):  # class folders (images directly in split_dir are not samples)
        per_class = [(w, _images(split_dir / w)) for w in folders]
        if synsets is not None:
            classes = synsets
        elif split != "train" and (root / "train").is_dir():
            classes = _subdirs(root / "train")  # val labels follow train's class order
        else:
            classes = folders
        label = _labeler(classes)
        files, labels = [], []
        for wnid, names in per_class:
            if not names:
                continue
            ci = label(wnid, f"folder {split_dir / wnid}")
            files.extend(f"{wnid}/{n}" for n in names)
            labels.extend([ci] * len(names))
    else:
        files = _images(split_dir)
        found = find_val_csv(root)
        if found is None:
            return _unlabelled(split_dir, split, tree,
                               f"its images are not in class folders, and no ground-truth CSV was found (looked for "
                               f"{root / 'val' / KAGGLE_CSV}, {root / KAGGLE_CSV} and any *.csv with a header "
                               f"'ImageId,PredictionString' or 'file,wnid' in {root / 'val'} and {root})")
        truth = _read_val_csv(*found)
        wnids = []
        for name in files:
            wnid = truth.get(name, truth.get(os.path.splitext(name)[0]))
            if wnid is None:
                raise LayoutError(f"{split_dir / name} has no row in {found[0]}")
            wnids.append(wnid)
        if synsets is not None:
            classes = synsets
        elif (root / "train").is_dir() and _subdirs(root / "train"):
            classes = _subdirs(root / "train")
        else:
            classes = sorted(set(wnids))
        label = _labeler(classes)
        labels = [label(w, f"{name} in {found[0].name}") for name, w in zip(files, wnids)]
    if not files:
        where = " (at any depth)" if not (tree.top or tree.nested) else " in its class folders"
        raise LayoutError(f"{split_dir} holds no images with extensions {IMAGE_EXTS}{where}")
    return Listing(split_dir, split, list(classes), files, np.asarray(labels, dtype=np.int64))


@dataclass
class _Tree:
    """Where the images under a folder are: ``top`` directly in it, ``nested`` (relative paths)
    in its subfolders at any depth, ``deeper`` how many of those are more than one folder down."""

    top: list[str]
    nested: list[str]
    deeper: list[str]

    @classmethod
    def scan(cls, folder: Path) -> "_Tree":
        top, nested, deeper = [], [], []
        seen = {os.path.realpath(folder)}  # symlinked folders are followed, each real folder once (no cycle)
        stack = [("", folder)]
        while stack:
            rel, path = stack.pop()
            for e in os.scandir(path):
                name = f"{rel}{e.name}"
                if e.is_dir():
                    real = os.path.realpath(e.path)
                    if real not in seen:
                        seen.add(real)
                        stack.append((name + "/", e.path))
                elif e.is_file() and e.name.lower().endswith(IMAGE_EXTS):
                    (nested if rel else top).append(name)
                    if rel.count("/") > 1:
                        deeper.append(name)
        return cls(sorted(top), sorted(nested), sorted(deeper))

    @property
    def unlabelled_reason(self) -> str | None:
        """Why these images cannot be class folders, or None when they may be (every image in a
        subfolder is one folder down; images directly in the folder are then not samples), or be
        a flat folder labelled by a CSV (no image in a subfolder)."""
        if self.deeper:
            n = len(self.deeper)
            return f"{n} image{' is' if n == 1 else 's are'} more than one folder down (e.g. {self.deeper[0]}), so its subfolders are not classes"
        return None


def _unlabelled(split_dir: Path, split: str, tree: _Tree, reason: str) -> Listing:
    """Every image under ``split_dir``, sorted by relative path, label -1, no classes."""
    files = sorted(tree.top + tree.nested)
    if not files:
        raise LayoutError(f"{split_dir} holds no images with extensions {IMAGE_EXTS} (at any depth)")
    return Listing(split_dir, split, [], files, np.full(len(files), -1, dtype=np.int64), unlabelled=reason)


def list_split(root: str | Path, split: str) -> Listing:
    """The files of ``<root>/<split>`` in global-index order with their labels (data_prep, eval)."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise LayoutError(f"{split_dir} is not a folder (expected <root>/{split}/<wnid>/<image> files)")
    return _list(root, split_dir, split)


def list_folder(root: str | Path, split: str = "train") -> Listing:
    """The trainer's ``data.path``: ``<root>/<split>`` when that folder exists (as ``list_split``),
    else ``<root>`` itself holding the class folders (synsets.txt looked for in ``<root>``)."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder (expected <root>/{split}/<wnid>/<image> or <root>/<class>/<image> files)")
    if (root / split).is_dir():
        return _list(root, root / split, split)
    # A root that has split folders but not this one: a missing or mistyped split, not a folder of
    # images (read as one, it would train on every split, or convert train as val, unlabelled)
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_NAMES)
    if splits:
        raise LayoutError(f"{root} has the split folder{'s' if len(splits) > 1 else ''} {', '.join(splits)} but no {split!r} "
                          f"(data.split / --split names the folder under {root} to read)")
    return _list(root, root, split)

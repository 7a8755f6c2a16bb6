"""mimscale.data.imagenet, the one listing: file order, class order from synsets.txt or sorted,
flat val with its CSV, the class-folder layout, errors that name the problem."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from mimscale.data.imagenet import IMAGE_EXTS, LayoutError, list_folder, list_split, read_synsets
from mimscale.data.sources import FolderSource

SAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / "train").is_dir(), reason=f"{SAMPLE} not present")


def _touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(n.encode())


def _sorted_listing(base: Path) -> tuple[list[str], list[str], list[int]]:
    """The folder source's listing before there was one listing: classes = sorted subfolders
    (empty ones keep a label), files sorted within a class. (classes, files, labels)"""
    classes = sorted(e.name for e in os.scandir(base) if e.is_dir())
    files, labels = [], []
    for ci, c in enumerate(classes):
        names = sorted(e.name for e in os.scandir(base / c) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
        files.extend(f"{c}/{n}" for n in names)
        labels.extend([ci] * len(names))
    return classes, files, labels


# ----------------------------------------------------------------------------------------------
# order and classes


@needs_sample
def test_listing_matches_folder_source():
    listing = list_split(SAMPLE, "train")
    fs = FolderSource(SAMPLE, "train")
    assert len(listing) == len(fs) == 1000
    assert listing.files == fs.files
    np.testing.assert_array_equal(listing.labels, fs.labels)
    synsets = [line.split("\t")[0] for line in (SAMPLE / "synsets.txt").read_text().splitlines()]
    assert listing.classes == synsets == fs.classes


@needs_sample
def test_sample_without_synsets_is_the_sorted_listing(tmp_path):
    """The ImageNet sample without its synsets.txt: exactly the order and labels of the sorted scan."""
    (tmp_path / "train").mkdir()
    for d in os.scandir(SAMPLE / "train"):
        os.symlink(d.path, tmp_path / "train" / d.name)
    classes, files, labels = _sorted_listing(tmp_path / "train")
    for listing in (list_split(tmp_path, "train"), list_folder(tmp_path), list_folder(tmp_path / "train")):
        assert listing.classes == classes and listing.files == files and listing.labels.tolist() == labels
    assert list_split(SAMPLE, "train").files == files  # its synsets.txt (sorted) changes nothing here


def test_without_synsets_equals_the_sorted_scan(tmp_path):
    # enough classes that directory-listing order (hash order on ext4) is not accidentally sorted
    rng = np.random.default_rng(0)
    for i in rng.permutation(40):
        _touch(tmp_path / "train" / f"n{i:03d}", [f"{k}_{i}.JPEG" for k in rng.permutation(5)[: 1 + i % 4]])
    (tmp_path / "train" / "n999").mkdir()  # no images: keeps its label slot
    _touch(tmp_path / "train" / "n005", ["notes.txt", "x.PNG", "y.webp"])
    classes, files, labels = _sorted_listing(tmp_path / "train")
    listing = list_split(tmp_path, "train")
    assert listing.classes == classes and listing.classes[-1] == "n999"
    assert listing.files == files
    assert listing.labels.tolist() == labels and listing.labels.dtype == np.int64
    assert list_folder(tmp_path).files == files


def test_listing_classes_from_synsets_order_and_unknown_wnid(tmp_path):
    for wnid in ["n2", "n1", "n3"]:
        _touch(tmp_path / "train" / wnid, ["b.JPEG", "a.jpg"])
    (tmp_path / "train" / "n1" / "notes.txt").write_text("not an image")
    listing = list_split(tmp_path, "train")
    assert listing.classes == ["n1", "n2", "n3"]  # sorted without synsets.txt
    assert listing.files == ["n1/a.jpg", "n1/b.JPEG", "n2/a.jpg", "n2/b.JPEG", "n3/a.jpg", "n3/b.JPEG"]
    assert listing.files == FolderSource(tmp_path, "train").files
    (tmp_path / "synsets.txt").write_text("n3\tthree\nn1\tone\nn2\ttwo\n")
    listing = list_split(tmp_path, "train")
    assert listing.classes == ["n3", "n1", "n2"]  # line order wins
    assert listing.files == ["n1/a.jpg", "n1/b.JPEG", "n2/a.jpg", "n2/b.JPEG", "n3/a.jpg", "n3/b.JPEG"]  # order kept
    assert listing.labels.tolist() == [1, 1, 2, 2, 0, 0]
    assert [listing.wnid(i) for i in range(6)] == ["n1", "n1", "n2", "n2", "n3", "n3"]
    (tmp_path / "train" / "n9").mkdir()
    (tmp_path / "train" / "n9" / "x.JPEG").write_bytes(b"x")
    with pytest.raises(LayoutError, match="n9"):
        list_split(tmp_path, "train")


def test_synsets_file_forms_and_duplicates(tmp_path):
    assert read_synsets(tmp_path) is None
    (tmp_path / "synsets.txt").write_text("n2 two words\n\nn1\tone\nn3\n")
    assert read_synsets(tmp_path) == ["n2", "n1", "n3"]
    (tmp_path / "synsets.txt").write_text("n2\tx\nn1\ty\nn2\tz\n")
    with pytest.raises(LayoutError, match="lists a wnid twice"):
        read_synsets(tmp_path)


def test_class_folder_layout_honours_its_synsets(tmp_path):
    """``list_folder`` on a folder of class folders (no <split>/ inside): synsets.txt is read
    from that folder; a synsets class without a folder still takes its index."""
    _touch(tmp_path / "b", ["2.JPEG", "1.JPEG"])
    _touch(tmp_path / "a", ["3.jpeg"])
    listing = list_folder(tmp_path, "train")
    assert listing.split_dir == tmp_path
    assert listing.classes == ["a", "b"] and listing.files == ["a/3.jpeg", "b/1.JPEG", "b/2.JPEG"]
    assert listing.labels.tolist() == [0, 1, 1]
    (tmp_path / "synsets.txt").write_text("z\tnone here\nb\tbee\na\tay\n")
    listing = list_folder(tmp_path, "train")
    assert listing.classes == ["z", "b", "a"]
    assert listing.files == ["a/3.jpeg", "b/1.JPEG", "b/2.JPEG"]
    assert listing.labels.tolist() == [2, 1, 1]


def test_val_follows_train_classes(tmp_path):
    _touch(tmp_path / "train" / "n1", ["a.JPEG"])
    _touch(tmp_path / "train" / "n2", ["b.JPEG"])
    _touch(tmp_path / "train" / "n3", ["c.JPEG"])
    _touch(tmp_path / "val" / "n3", ["v.JPEG"])  # val holds only the last class
    listing = list_split(tmp_path, "val")
    assert listing.classes == ["n1", "n2", "n3"] and listing.labels.tolist() == [2]
    assert list_folder(tmp_path, "val").labels.tolist() == [2]


def test_fingerprint_changes_with_files_and_labels(tmp_path):
    _touch(tmp_path / "train" / "n1", ["a.JPEG"])
    _touch(tmp_path / "train" / "n2", ["b.JPEG"])
    first = list_split(tmp_path, "train").fingerprint()
    assert first == list_split(tmp_path, "train").fingerprint()
    (tmp_path / "synsets.txt").write_text("n2\nn1\n")
    relabelled = list_split(tmp_path, "train").fingerprint()
    _touch(tmp_path / "train" / "n2", ["c.JPEG"])
    assert len({first, relabelled, list_split(tmp_path, "train").fingerprint()}) == 3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(LayoutError, match=r"train is not a folder \(expected <root>/train/<wnid>/<image> files\)"):
        list_split(tmp_path, "train")
    with pytest.raises(LayoutError, match="missing is not a folder"):
        list_folder(tmp_path / "missing")
    _touch(tmp_path / "train" / "n1", ["notes.txt"])
    with pytest.raises(LayoutError, match=r"holds no images with extensions \('.jpeg'"):
        list_split(tmp_path, "train")


# ----------------------------------------------------------------------------------------------
# flat val


def flat_val(root: Path) -> dict[str, str]:
    """train/ with 3 classes, flat val/ with 5 files; returns val file -> wnid."""
    for wnid in ["n01", "n02", "n03"]:
        _touch(root / "train" / wnid, ["t.JPEG"])
    truth = {"ILSVRC2012_val_00000003.JPEG": "n02", "ILSVRC2012_val_00000001.JPEG": "n03",
             "ILSVRC2012_val_00000002.JPEG": "n01", "ILSVRC2012_val_00000005.JPEG": "n01",
             "ILSVRC2012_val_00000004.JPEG": "n03"}
    _touch(root / "val", list(truth))
    return truth


def write_kaggle_csv(root: Path, truth: dict[str, str]) -> None:
    """Kaggle's LOC_val_solution.csv for ``truth`` (rows reversed, plus a row for a missing file)."""
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for name, wnid in reversed(truth.items()):
            w.writerow([name[:-5], f"{wnid} 10 20 30 40 {wnid} 1 2 3 4"])
        w.writerow(["ILSVRC2012_val_00009999", "n01 1 2 3 4"])  # a row whose file is not here


def test_flat_val_with_kaggle_csv(tmp_path):
    truth = flat_val(tmp_path)
    unlabelled = list_split(tmp_path, "val")  # without its CSV: a plain folder of images, listed unlabelled
    assert unlabelled.labels.tolist() == [-1] * 5 and unlabelled.classes == []
    with pytest.raises(LayoutError, match=r"evaluation needs labelled images, .*val is unlabelled: .*LOC_val_solution.csv"):
        unlabelled.require_labels("evaluation")
    write_kaggle_csv(tmp_path, truth)
    listing = list_split(tmp_path, "val")
    assert listing.files == sorted(truth)
    assert [listing.wnid(i) for i in range(len(listing))] == [truth[f] for f in sorted(truth)]
    assert listing.labels.tolist() == [["n01", "n02", "n03"].index(truth[f]) for f in sorted(truth)]
    assert FolderSource(tmp_path, "val").files == listing.files  # the trainer reads it too


def test_flat_val_with_simple_csv_and_unknown_wnid(tmp_path):
    truth = flat_val(tmp_path)
    rows = [["file", "wnid"]] + [[name, wnid] for name, wnid in truth.items()]
    with open(tmp_path / "val" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    listing = list_split(tmp_path, "val")
    assert [listing.wnid(i) for i in range(5)] == [truth[f] for f in sorted(truth)]
    rows[1][1] = "n77"
    with open(tmp_path / "val" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(LayoutError, match="n77"):
        list_split(tmp_path, "val")


def test_flat_val_file_without_a_row(tmp_path):
    truth = flat_val(tmp_path)
    write_kaggle_csv(tmp_path, truth)
    _touch(tmp_path / "val", ["ILSVRC2012_val_00000006.JPEG"])
    with pytest.raises(LayoutError, match="ILSVRC2012_val_00000006.JPEG has no row in .*LOC_val_solution.csv"):
        list_split(tmp_path, "val")

"""mimscale.data.sources: the folder source's layouts, order and labels; synthetic images; the
indexable-source factory."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mimscale.config import DataConfig
from mimscale.data.imagenet import LayoutError, list_split
from mimscale.data.sources import FolderSource, SyntheticSource, indexed_source


def _touch_tree(base: Path, layout: dict[str, list[str]]) -> None:
    for cls, names in layout.items():
        (base / cls).mkdir(parents=True, exist_ok=True)
        for n in names:
            (base / cls / n).write_bytes(n.encode())


@pytest.mark.parametrize("with_split", [True, False])
def test_folder_source_layouts_order_and_labels(tmp_path, with_split):
    base = tmp_path / "train" if with_split else tmp_path
    _touch_tree(
        base,
        {
            "n02": ["b.JPEG", "a.jpeg", "notes.txt"],
            "n01": ["z.png", "y.JPG"],
            "n10": [],  # a class with no images keeps its label slot
            "n03": ["c.webp", "d.bmp"],
        },
    )
    (base / "README.JPEG").write_bytes(b"x")  # files directly under the root are not samples
    src = FolderSource(tmp_path)
    assert src.root == base
    assert src.classes == ["n01", "n02", "n03", "n10"]
    assert src.files == ["n01/y.JPG", "n01/z.png", "n02/a.jpeg", "n02/b.JPEG", "n03/c.webp", "n03/d.bmp"]
    assert len(src) == 6
    assert [src.label(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert src.labels.dtype == np.int64
    assert src.read(3) == b"b.JPEG"
    assert src.name(3) == str(base / "n02" / "b.JPEG")


def test_folder_source_many_classes_sorted(tmp_path):
    # enough classes that directory-listing order (hash order on ext4) is not accidentally sorted
    order = [7, 3, 11, 0, 9, 1, 5, 10, 2, 8, 4, 6, 13, 12]
    _touch_tree(tmp_path, {f"n{i:02d}": [f"{i}_b.JPEG", f"{i}_a.JPEG"] for i in order})
    src = FolderSource(tmp_path)
    assert src.classes == [f"n{i:02d}" for i in range(14)]
    assert src.files[:4] == ["n00/0_a.JPEG", "n00/0_b.JPEG", "n01/1_a.JPEG", "n01/1_b.JPEG"]
    assert src.labels.tolist() == [i // 2 for i in range(28)]
    assert all(src.read(i) == src.files[i].split("/")[1].encode() for i in range(28))


def test_folder_source_other_split(tmp_path):
    _touch_tree(tmp_path / "train", {"a": ["1.JPEG"], "b": []})
    _touch_tree(tmp_path / "val", {"a": ["1.JPEG", "2.JPEG"], "b": ["3.JPEG"]})
    assert len(FolderSource(tmp_path, "val")) == 3
    assert len(FolderSource(tmp_path)) == 1
    # val's labels follow train's classes (as in every converted format): a val class train lacks is named
    _touch_tree(tmp_path / "val", {"c": ["4.JPEG"]})
    with pytest.raises(LayoutError, match="wnid 'c'"):
        FolderSource(tmp_path, "val")


def test_folder_source_errors(tmp_path):
    # the listing's LayoutError (a ValueError), naming the setting and the folder
    with pytest.raises(LayoutError, match=r"data\.path: .*missing is not a folder"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match=r"data.path: .*empty holds no images with extensions .* \(at any depth\)"):
        FolderSource(tmp_path / "empty")
    _touch_tree(tmp_path / "noimg" / "train", {"a": ["x.txt"], "b": []})
    with pytest.raises(LayoutError, match="data.path: .*noimg.train holds no images"):
        FolderSource(tmp_path / "noimg")
    _touch_tree(tmp_path / "extra" / "train", {"n1": ["a.JPEG"], "n2": ["b.JPEG"]})
    (tmp_path / "extra" / "synsets.txt").write_text("n1\tone\n")
    with pytest.raises(LayoutError, match="data.path: wnid 'n2'"):
        FolderSource(tmp_path / "extra")


@pytest.mark.parametrize("with_split", [True, False])
def test_folder_source_honours_synsets(tmp_path, with_split):
    """Labels follow synsets.txt (next to train/, or next to the class folders); the order of the
    files, hence every global index, stays sorted."""
    base = tmp_path / "train" if with_split else tmp_path
    _touch_tree(base, {"n2": ["b.JPEG", "a.JPEG"], "n1": ["c.JPEG"], "n3": ["d.JPEG"]})
    plain = FolderSource(tmp_path)
    assert plain.classes == ["n1", "n2", "n3"] and plain.labels.tolist() == [0, 1, 1, 2]
    (tmp_path / "synsets.txt").write_text("n3\tthree\nn1\tone\nn2\ttwo\nn4\tfour\n")
    src = FolderSource(tmp_path)
    assert src.classes == ["n3", "n1", "n2", "n4"]
    assert src.files == plain.files == ["n1/c.JPEG", "n2/a.JPEG", "n2/b.JPEG", "n3/d.JPEG"]
    assert src.labels.tolist() == [1, 2, 2, 0]
    assert src.labels.dtype == np.int64


def test_folder_source_is_the_listing(tmp_path):
    _touch_tree(tmp_path / "train", {"n2": ["b.JPEG"], "n1": ["a.png", "z.JPEG"]})
    _touch_tree(tmp_path / "val", {"n2": ["v.JPEG"]})  # a val split without class n1
    listing = list_split(tmp_path, "val")
    src = FolderSource(tmp_path, "val")
    assert src.files == listing.files == ["n2/v.JPEG"]
    assert src.labels.tolist() == listing.labels.tolist() == [1]  # train's class order
    assert src.classes == listing.classes == ["n1", "n2"]
    again = FolderSource.from_listing(list_split(tmp_path, "train"))
    assert again.files == FolderSource(tmp_path).files and again.read(0) == b"a.png"
    assert again.root == tmp_path / "train"


def test_indexed_source(tmp_path):
    _touch_tree(tmp_path / "train", {"n1": ["a.JPEG"]})
    src = indexed_source(DataConfig(source="folder", path=str(tmp_path), split="train"))
    assert isinstance(src, FolderSource) and src.files == ["n1/a.JPEG"]
    syn = indexed_source(DataConfig(source="synthetic", synthetic_count=7, synthetic_size=24), seed=3)
    assert isinstance(syn, SyntheticSource) and len(syn) == 7 and syn.size == 24 and syn.seed == 1234 + 3
    with pytest.raises(ValueError, match="'wds' is not an indexable source"):
        indexed_source(DataConfig(source="wds", path=str(tmp_path)))


def test_synthetic_source_deterministic():
    a, b = SyntheticSource(10, size=32, seed=1), SyntheticSource(10, size=32, seed=1)
    assert len(a) == 10
    x = a.array(3)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x, b.array(3))
    assert not np.array_equal(x, a.array(4))
    assert not np.array_equal(x, SyntheticSource(10, size=32, seed=2).array(3))
    assert [a.label(i) for i in (0, 9)] == [0, 9]
    # smooth: neighbouring pixels are close (upsampled noise), unlike raw noise
    assert np.abs(np.diff(x.astype(int), axis=1)).mean() < 20
    assert math.isfinite(float(x.std())) and x.std() > 5

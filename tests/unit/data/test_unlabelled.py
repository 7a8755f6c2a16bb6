"""Unlabelled image folders (issue 27.6): pretraining reads a plain folder of images at any depth
(label -1), data_prep writes shards and .betons from it that load and verify, and evaluation
refuses it naming why."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from data_prep import verify as verify_mod
from data_prep.wds import write_shards
from mimscale.config import DataConfig
from mimscale.data.imagenet import LayoutError, list_folder
from mimscale.data.sources import FolderSource
from mimscale.data.streams import build_source, open_full_pass, open_stream
from mimscale.errors import ConfigError
from mimscale.eval.features import OptionError, open_split
from tests.unit.data.test_data_errors import write_images

HAS_FFCV = importlib.util.find_spec("ffcv") is not None

# images at depths 1 to 4, in folders that are no classes, and one file that is no image
NAMES = ["top.jpg", "2019/a.jpg", "2019/b.JPEG", "2019/03/c.png", "2020/trip/day1/d.jpg", "2020/trip/day1/e.jpg",
         "2020/trip/f.jpeg", "misc/g.jpg"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_images(root, NAMES)
    (root / "2019" / "notes.txt").write_text("not an image")
    return root


def test_listing_of_a_nested_unlabelled_folder(photos):
    listing = list_folder(photos)  # no train/ inside: the folder itself, as data.path reads it
    assert listing.files == sorted(NAMES) and listing.classes == []
    assert listing.labels.tolist() == [-1] * len(NAMES) and listing.wnid(0) is None
    assert "more than one folder down (e.g. 2019/03/c.png)" in listing.unlabelled
    with pytest.raises(LayoutError, match=rf"evaluation needs labelled images, and {photos} is unlabelled: "):
        listing.require_labels("evaluation")


def test_class_folders_stay_labelled_and_a_deeper_image_makes_them_unlabelled(tmp_path):
    write_images(tmp_path / "train", ["n01/a.jpg", "n01/b.jpg", "n02/c.jpg"])
    write_images(tmp_path / "train", ["stray.jpg"])  # beside class folders: not a sample (as before)
    labelled = list_folder(tmp_path)
    assert labelled.classes == ["n01", "n02"] and labelled.labels.tolist() == [0, 0, 1] and not labelled.unlabelled
    # one image a folder further down: the tree is listed whole, unlabelled, rather than partly ignored
    write_images(tmp_path / "train", ["n02/extra/d.jpg"])
    unlabelled = list_folder(tmp_path)
    assert unlabelled.files == ["n01/a.jpg", "n01/b.jpg", "n02/c.jpg", "n02/extra/d.jpg", "stray.jpg"]
    assert unlabelled.labels.tolist() == [-1] * 5


def test_a_missing_split_beside_other_splits_is_a_layout_error_not_an_unlabelled_tree(tmp_path):
    """--split val over a root with only train/ (or data.split=training over train/ and val/) must
    not read the whole root as one unlabelled folder."""
    write_images(tmp_path / "train", ["n01/a.jpg", "n01/b.jpg"])
    with pytest.raises(LayoutError, match=r"has the split folder train but no 'val' \(data.split / --split"):
        list_folder(tmp_path, "val")
    write_images(tmp_path / "val", ["n01/c.jpg"])
    with pytest.raises(LayoutError, match=r"has the split folders train, val but no 'training'"):
        list_folder(tmp_path, "training")
    assert list_folder(tmp_path, "val").files == ["n01/c.jpg"]


def test_a_flat_folder_without_csv_is_unlabelled_and_an_empty_tree_is_an_error(tmp_path):
    write_images(tmp_path / "flat", ["b.jpg", "a.jpg"])
    src = FolderSource(tmp_path / "flat")
    assert src.files == ["a.jpg", "b.jpg"] and src.label(0) == -1
    (tmp_path / "empty" / "deep" / "er").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"data.path: .*empty holds no images with extensions .* \(at any depth\)") as e:
        FolderSource(tmp_path / "empty")
    assert isinstance(e.value, ConfigError)  # a run ends on it with exit code 2, no traceback


def test_pretraining_batches_from_a_nested_unlabelled_folder(photos):
    cfg = DataConfig(source="folder", path=str(photos), num_workers=0)
    source = build_source(cfg)
    assert len(source) == len(NAMES)
    it = iter(open_stream(cfg, source, img_size=16, micro_batch=4, rank=0, world_size=1, seed=0))
    batches = [next(it) for _ in range(3)]  # past one epoch of 2 batches
    for b in batches:
        assert b["image"].shape == (4, 3, 16, 16) and b["label"].tolist() == [-1] * 4 and int(b["skipped"]) == 0
    assert sorted(batches[0]["index"].tolist() + batches[1]["index"].tolist()) == list(range(len(NAMES)))
    # AMT's whole-image pass reads it too
    whole = list(open_full_pass(cfg, source, img_size=16, batch_size=4, rank=0, world_size=1))
    assert sum(len(b["index"]) for b in whole) == len(NAMES)


def test_wds_shards_of_an_unlabelled_folder_load_verify_and_are_refused_by_eval(photos, tmp_path):
    out = tmp_path / "shards"
    m = write_shards(photos, "train", out, shard_size=3, workers=1, progress=False)
    assert m["num_samples"] == len(NAMES) and m["classes"] == [] and "more than one folder down" in m["unlabelled"]
    problems, checked = verify_mod.verify(out, workers=1)
    assert problems == [] and checked == len(NAMES)
    cfg = DataConfig(source="wds", path=str(out), num_workers=0, shuffle_buffer=4)
    it = iter(open_stream(cfg, build_source(cfg), img_size=16, micro_batch=4, rank=0, world_size=1, seed=0))
    b = next(it)
    assert b["image"].shape == (4, 3, 16, 16) and b["label"].tolist() == [-1] * 4
    with pytest.raises(OptionError, match=r"evaluation needs labelled images, and the shards in .* unlabelled folder"):
        open_split(out, "train", "wds")


def test_eval_refuses_an_unlabelled_folder(photos, tmp_path):
    write_images(tmp_path / "val", ["x/y/z.jpg", "w.jpg"])
    with pytest.raises(OptionError, match=r"--data: evaluation needs labelled images, and .*val is unlabelled: 1 image is more than one folder down "
                                        r"\(e.g. x/y/z.jpg\).* Expected .*val/<class>/<image> files, or a flat folder .*ground-truth CSV"):
        open_split(tmp_path, "val", "folder")


@pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not importable in this environment (the optional [ffcv] extra)")
def test_ffcv_beton_of_an_unlabelled_folder_loads_verifies_and_is_refused_by_eval(photos, tmp_path):
    from data_prep.ffcv import write_beton

    out = tmp_path / "photos.beton"
    m = write_beton(photos, "train", out, workers=1, progress=False)
    assert m["num_samples"] == len(NAMES) and m["classes"] == [] and m["unlabelled"]
    problems, checked = verify_mod.verify(out, workers=1)
    assert problems == [] and checked == len(NAMES)
    cfg = DataConfig(source="ffcv", path=str(out), num_workers=1)
    source = build_source(cfg)
    assert source.unlabelled() and [source.label(i) for i in range(len(source))] == [-1] * len(NAMES)
    batches = list(open_full_pass(cfg, source, img_size=16, batch_size=4, rank=0, world_size=1, crop_pct=0.875))
    assert sum(len(b["index"]) for b in batches) == len(NAMES)
    with pytest.raises(OptionError, match=r"evaluation needs labelled images, and every label in .*photos.beton is -1"):
        open_split(out, "train", "ffcv")

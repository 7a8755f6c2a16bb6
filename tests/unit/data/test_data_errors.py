"""Errors a user meets first with real broken data (issue 27.5): a really truncated .beton and
WebDataset shard name the file and the fix; a dataset changed in place under a run is refused on
resume (both counts named) unless data.resume_changes=allow."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import verify as verify_mod
from data_prep.wds import write_shards
from mimscale.config import DataConfig
from mimscale.data.describe import identity
from mimscale.data.streams import StreamPosition, build_source, open_full_pass, open_stream
from mimscale.errors import ConfigError

HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def write_images(folder: Path, names: list[str], size=(40, 32)) -> None:
    """Small random JPEGs at ``folder/<name>`` (any nesting)."""
    for n in names:
        path = folder / n
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(abs(hash(n)) % 2**32)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def class_tree(root: Path, per_class: int = 6) -> Path:
    write_images(root / "train", [f"{c}/{i}.jpg" for c in ("n01", "n02") for i in range(per_class)])
    return root


def _cfg(source: str, path: Path, **kw) -> DataConfig:
    return DataConfig(source=source, path=str(path), num_workers=0, shuffle_buffer=4, **kw)


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- .beton
@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    if not HAS_FFCV:
        pytest.skip("ffcv is not importable in this environment (the optional [ffcv] extra): no .beton can be written")
    from data_prep.ffcv import write_beton

    root = class_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("beton") / "train.beton"
    m = write_beton(root, "train", out, workers=1, progress=False)
    assert m["num_samples"] == 12
    return out


@pytest.mark.parametrize("sidecar", [True, False], ids=["with-sidecar", "without-sidecar"])
def test_truncated_beton_names_file_and_verify(beton, tmp_path, sidecar):
    from mimscale.data.sources import CorruptDataFile, FfcvFile

    size = beton.stat().st_size
    assert len(FfcvFile.open(beton)) == 12  # the whole file opens
    # cuts: inside the allocation table (at an entry boundary and not), inside the data, the
    # metadata, the header; FFCV's own reader said "negative dimensions are not allowed" (or
    # opened the file with a table one entry short)
    for cut in (size - 10, size - 24, size // 2, 5000, 10, 0):
        copy = tmp_path / "cut.beton"
        shutil.copy(beton, copy)
        if sidecar:
            shutil.copy(beton.with_name(beton.name + ".json"), tmp_path / "cut.beton.json")
        os.truncate(copy, cut)
        with pytest.raises(CorruptDataFile) as e:
            FfcvFile.open(copy)
        msg = str(e.value)
        assert f"data.path {copy} is a truncated or corrupt FFCV file" in msg, msg
        assert "truncated)" in msg and f"python -m data_prep.verify {copy}" in msg, msg
        assert isinstance(e.value, ConfigError)  # pretrain exits 2 on it
    # data_prep.verify says the same (with the sidecar; without one it stops at the missing sidecar)
    problems, checked = verify_mod.verify(tmp_path / "cut.beton", workers=1)
    assert checked == 0 and any("truncated" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = class_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("shards")
    m = write_shards(root, "train", out, shard_size=4, workers=1, progress=False)
    assert [s["count"] for s in m["shards"]] == [4, 4, 4]
    return out


@pytest.mark.parametrize("where", ["member-boundary", "mid-member"])
def test_truncated_shard_is_named_with_its_counts(shards, tmp_path, capfd, where):
    """tarfile ends a tar cut at a member boundary silently: the reader compares the samples read
    with the manifest's count, names the shard, counts the missing samples as skipped, and
    points at data_prep.verify (which names the shard too)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "train-000001.tar"
    # each sample is 3 members (512-byte header + data padded to 512); 5120 ends after the first
    # sample's members, 7000 cuts the second sample's JPEG
    os.truncate(shard, 5120 if where == "member-boundary" else 7000)
    index = build_source(_cfg("wds", copy))
    batches = list(open_full_pass(_cfg("wds", copy), index, img_size=16, batch_size=4, rank=0, world_size=1, crop_pct=0.875))
    err = capfd.readouterr().err
    assert f"shard {shard}: 1 of its 4 samples readable" in err, err
    assert "truncated or damaged" in err and f"python -m data_prep.verify {copy}" in err, err
    assert sum(len(b["index"]) for b in batches) == 9
    assert sum(int(b["skipped"]) for b in batches) == 3
    problems, _ = verify_mod.verify(copy, workers=1)
    assert any(p.startswith("train-000001.tar:") for p in problems), problems


# ---------------------------------------------------------------------------------------------- changed data
def _position_after(cfg: DataConfig, batches: int = 2) -> dict:
    """The data state a checkpoint would save after ``batches`` micro batches of a stream over cfg."""
    source = build_source(cfg)
    position = StreamPosition(cfg.num_workers)
    for b in _take(open_stream(cfg, source, img_size=16, micro_batch=4, rank=0, world_size=1, seed=0, position=position), batches):
        position.observe(b)
    return position.state_dict()


def _resume(cfg: DataConfig, state: dict):
    position = StreamPosition(cfg.num_workers)
    position.load_state_dict(state)
    stream = open_stream(cfg, build_source(cfg), img_size=16, micro_batch=4, rank=0, world_size=1, seed=0, start_micro_batch=2,
                         position=position)
    return position, stream


def test_a_resume_over_a_changed_folder_is_refused_naming_both_counts(tmp_path):
    root = tmp_path / "data"
    write_images(root, [f"{c}/{i:02d}.jpg" for c in ("n01", "n02") for i in range(20)])
    cfg = _cfg("folder", root)
    state = _position_after(cfg)
    assert state["dataset"]["count"] == 40 and state["dataset"]["source"] == "folder"

    # the same files elsewhere (a copy to node-local disk): the same identity, the resume goes on
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    position, stream = _resume(_cfg("folder", moved), state)
    assert _take(stream, 1)[0]["image"].shape == (4, 3, 16, 16)
    assert position.state_dict()["dataset"]["sha256"] == state["dataset"]["sha256"]

    # in place: 10 files removed, 20 added
    for f in sorted(root.rglob("*.jpg"))[:10]:
        f.unlink()
    write_images(root, [f"n02/new{i:02d}.jpg" for i in range(20)])
    with pytest.raises(ConfigError) as e:
        _resume(cfg, state)
    msg = str(e.value)
    assert f"the data at data.path {root} changed since the checkpoint (40 samples when the checkpoint was written, 50 now" in msg, msg
    assert "fingerprint differs" in msg and "--set data.resume_changes=allow" in msg, msg

    # the same count, other files: the fingerprint alone tells
    for f in sorted(root.glob("n02/new*.jpg")):
        f.unlink()
    write_images(root, [f"n01/other{i:02d}.jpg" for i in range(10)])
    with pytest.raises(ConfigError, match=r"\(40 samples as before; the folder fingerprint differs"):
        _resume(cfg, state)

    # allow: a warning, and the stream runs over the new listing, whose identity the next save records
    position, stream = _resume(_cfg("folder", root, resume_changes="allow"), state)
    assert _take(stream, 1)[0]["image"].shape == (4, 3, 16, 16)
    assert position.state_dict()["dataset"]["sha256"] != state["dataset"]["sha256"]


def test_a_resume_over_rewritten_shards_is_refused(tmp_path):
    """WebDataset: the manifest is the identity (it lists every shard's sha256 and the source
    listing's): shards rewritten from a changed folder are another dataset."""
    src = class_tree(tmp_path / "src", per_class=10)
    out = tmp_path / "shards"
    write_shards(src, "train", out, shard_size=8, workers=1, progress=False)
    state = _position_after(_cfg("wds", out))
    assert state["dataset"]["count"] == 20
    for f in sorted((src / "train" / "n01").glob("*.jpg"))[:3]:
        f.unlink()
    shutil.rmtree(out)
    write_shards(src, "train", out, shard_size=8, workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"20 samples when the checkpoint was written, 17 now; the wds fingerprint differs"):
        _resume(_cfg("wds", out), state)


def test_no_check_without_a_recorded_dataset_or_after_a_source_change(tmp_path):
    root = class_tree(tmp_path)
    cfg = _cfg("folder", root)
    now = identity(cfg, build_source(cfg))
    fresh = StreamPosition(0)
    fresh.load_state_dict({})  # a checkpoint written before the data state held an identity
    assert fresh.check_dataset(now) is None and fresh.state_dict() == {"dataset": now}
    other = StreamPosition(0)
    other.load_state_dict({"dataset": {**now, "source": "synthetic", "count": 7}})  # data.source itself changed (a config change)
    assert other.check_dataset(now) is None

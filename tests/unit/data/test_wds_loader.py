"""WebDataset loader: exactly-once evaluation, resumable resampled training streams, crop pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.wds import write_shards
from mimscale.config import DataConfig
from mimscale.data.streams import StreamPosition, build_source, open_stream
from mimscale.data.wds_loader import ShardIndex, build_wds_loader, read_shards
from tests.unit.data.test_crop import _expected_gradient_crop, _gradient

N = 45  # samples: shards of 7 leave a short last shard
SIZE = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """An ImageNet-layout tree of gradient JPEGs (3 classes, a few aspect ratios) as wds shards."""
    root = tmp_path_factory.mktemp("imagenet")
    for i in range(N):
        d = root / "train" / f"n0000000{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = [(96, 64), (64, 96), (80, 80)][i % 3]
        Image.fromarray(_gradient(w, h)).save(d / f"img_{i:03d}.JPEG", quality=98)
    out = root / "shards"
    write_shards(root, "train", out, shard_size=7, workers=1, progress=False)
    return out


def _cfg(path: Path, workers: int, buffer: int = 10) -> DataConfig:
    return DataConfig(source="wds", path=str(path), num_workers=workers, shuffle_buffer=buffer)


def _take(loader, n: int, position: StreamPosition | None = None) -> list[dict]:
    out, it = [], iter(loader)
    for _ in range(n):
        b = next(it)
        if position is not None:
            position.observe(b)
        out.append(b)
    return out


def test_source_counts_manifest(shards):
    src = build_source(_cfg(shards, 0))
    assert isinstance(src, ShardIndex) and len(src) == N and src.num_shards == 7
    assert src.counts.tolist() == [7] * 6 + [3]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_mode_sees_every_sample_exactly_once_across_ranks(shards, workers):
    index = ShardIndex.load(shards)
    seen = []
    for rank in range(2):
        loader = build_wds_loader(index, _cfg(shards, workers), SIZE, 4, rank, 2, seed=0, mode="eval")
        for b in loader:
            assert b["image"].shape[1:] == (3, SIZE, SIZE) and len(b["image"]) <= 4
            seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(N))


def test_train_streams_resume_exactly(shards):
    """Stop after m batches (m not a multiple of the worker count), restart from the checkpointed
    cursors: the next batches are those an uninterrupted stream gives (ids and pixels)."""
    index = ShardIndex.load(shards)
    cfg = _cfg(shards, 2)
    m, more = 5, 6
    pos = StreamPosition(2)
    full = _take(build_wds_loader(index, cfg, SIZE, 4, 1, 2, seed=3), m + more)
    for b in full[:m]:
        pos.observe(b)
    state = pos.state()
    assert set(state["cursors"]) == {0, 1}  # both streams were consumed from
    restored, warning = StreamPosition.restore(state, 2)
    assert warning is None
    resumed = _take(open_stream(cfg, index, img_size=SIZE, micro_batch=4, rank=1, world_size=2, seed=3, start_micro_batch=m, position=restored), more)
    for a, b in zip(full[m:], resumed):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["box"], b["box"]) and torch.equal(a["flip"], b["flip"])


def test_train_stream_passes_group_boundaries_and_differs_across_ranks(shards):
    index = ShardIndex.load(shards)
    cfg = _cfg(shards, 0, buffer=10)  # groups of 2 shards (14 samples): several groups in 12 batches
    r0 = torch.cat([b["index"] for b in _take(build_wds_loader(index, cfg, SIZE, 4, 0, 2, seed=0), 12)])
    r1 = torch.cat([b["index"] for b in _take(build_wds_loader(index, cfg, SIZE, 4, 1, 2, seed=0), 12)])
    assert len(set(r0.tolist())) > N // 2  # shuffled across many shards, not stuck on one
    assert not torch.equal(r0, r1)


def test_worker_count_change_restarts_streams_with_warning():
    pos, warning = StreamPosition.restore({"workers": 4, "cursors": {0: 10, 1: 12}}, 2)
    assert warning is not None and "num_workers" in warning and pos.cursors == {}
    pos, warning = StreamPosition.restore({"workers": 2, "cursors": {"0": 10, "1": 12}}, 2)
    assert warning is None and pos.cursors == {0: 10, 1: 12}


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_names_the_shard_of_its_last_sample(shards, workers):
    """The name a data-stall error reports; a str that survives the DataLoader (and its workers)
    and that StreamPosition removes with the cursor before the model sees the batch."""
    index = ShardIndex.load(shards)
    position = StreamPosition(workers)
    names = {}
    for b in _take(build_wds_loader(index, _cfg(shards, workers), SIZE, 5, 0, 1, seed=3), 4):
        assert isinstance(b["shard"], str) and b["shard"] in index.names
        names[int(b["index"][-1])] = b["shard"]
        position.observe(b)
        assert "shard" not in b and "cursor" not in b
    home = {json.loads(rec["json"])["index"]: rec["__url__"] for rec in read_shards(index, range(index.num_shards), {})}
    assert names and all(home[i] == n for i, n in names.items()), (names, home)


def test_crop_box_and_flip_match_pixels(shards):
    index = ShardIndex.load(shards)
    size = 24
    loader = build_wds_loader(index, _cfg(shards, 0), size, 8, 0, 1, seed=1)
    flips = 0
    sizes = {0: (96, 64), 1: (64, 96), 2: (80, 80)}
    for b in _take(loader, 4):
        for img, box, flip, label in zip(b["image"], b["box"], b["flip"], b["label"]):
            w, h = sizes[int(label)]
            got = img.permute(1, 2, 0).numpy()
            got = got[:, ::-1] if flip else got
            exp = _expected_gradient_crop(box.tolist(), w, h, size)
            assert np.abs(got[..., :2].astype(np.float64) - exp).mean() < 4.0
            flips += int(flip)
    assert 0 < flips < 32


def test_damaged_shard_is_skipped_and_counted(shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = copy / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated mid-member
    index = ShardIndex.load(copy)
    loader = build_wds_loader(index, _cfg(copy, 0), SIZE, 4, 0, 1, seed=0, mode="eval")
    batches = list(loader)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    skipped = sum(int(b["skipped"]) for b in batches)
    assert len(seen) == len(set(seen)) and N - 7 <= len(seen) < N
    assert skipped >= 1


@pytest.mark.parametrize("how", ["unreadable", "undecodable"])
def test_a_stream_of_only_bad_data_ends_instead_of_looping(shards, tmp_path, how):
    """All shards unreadable, or every sample undecodable: the training stream stops with an error
    after data.max_bad_in_a_row failures in a row (it used to loop forever in silence)."""
    import io
    import shutil
    import tarfile

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    for tar in copy.glob("*.tar"):
        if how == "unreadable":
            tar.chmod(0)
            tar.unlink()  # open() fails: no such file
        else:  # the same members, every jpg replaced by garbage
            members = []
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    data = t.extractfile(m).read()
                    members.append((m, b"not a jpeg" if m.name.endswith(".jpg") else data))
            with tarfile.open(tar, "w") as t:
                for m, data in members:
                    m.size = len(data)
                    t.addfile(m, io.BytesIO(data))
    cfg = DataConfig(source="wds", path=str(copy), num_workers=0, shuffle_buffer=10, max_bad_in_a_row=5)
    loader = build_wds_loader(ShardIndex.load(copy), cfg, SIZE, 4, 0, 1, seed=0)
    with pytest.raises(RuntimeError, match=r"unreadable shards or samples in a row \(data.max_bad_in_a_row = 5\)"):
        next(iter(loader))


def test_missing_manifest_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.wds"):
        ShardIndex.load(tmp_path)


def test_starting_the_loader_leaves_the_global_rng_alone(shards):
    # masking draws from the global torch RNG, which a resumed run restores before the loader starts
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _take(build_wds_loader(ShardIndex.load(shards), _cfg(shards, 2), SIZE, 4, 0, 1, seed=0), 1)
    assert torch.equal(torch.rand(3), expected)

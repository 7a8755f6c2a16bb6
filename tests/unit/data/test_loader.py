"""mimscale.data.loader: CropDataset determinism and bad files, build_loader's contract, workers,
resume and RNG isolation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.config import DataConfig
from mimscale.data.loader import CropDataset, build_loader, collate
from mimscale.data.sampler import ShardedBatchSampler
from mimscale.data.sources import FolderSource, SyntheticSource
from tests.unit.data.test_crop import _encode, _real_gray, _real_jpegs

# ----------------------------------------------------------------------------------------------
# CropDataset: determinism and bad files


def test_crop_dataset_deterministic_per_epoch_and_index(tmp_path):
    root = tmp_path / "train" / "c"
    root.mkdir(parents=True)
    for p in _real_jpegs(4):
        shutil.copy(p, root / p.name)
    for source in (FolderSource(tmp_path), SyntheticSource(4, size=64)):
        ds = CropDataset(source, 32, seed=5)
        ds_other = CropDataset(source, 32, seed=5)
        for i in range(4):
            a, b, c = ds[(0, i)], ds[(0, i)], ds_other[(0, i)]
            for k in ("image", "box"):
                assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
            assert a["flip"] == b["flip"] and a["index"] == i and a["skipped"] == 0
            d = ds[(1, i)]
            assert not torch.equal(a["box"], d["box"])
            assert not torch.equal(a["image"], d["image"])
        # the seed matters too
        assert not torch.equal(CropDataset(source, 32, seed=6)[(0, 0)]["box"], ds[(0, 0)]["box"])


def _bad_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """A class folder whose sorted file names interleave good and bad files."""
    cls = tmp_path / "data" / "train" / "cls"
    cls.mkdir(parents=True)
    real = _real_jpegs(3)
    truncated = real[0].read_bytes()
    files = {
        "00_good.JPEG": real[0].read_bytes(),
        "01_truncated.JPEG": truncated[: len(truncated) // 2],
        "02_good.JPEG": real[1].read_bytes(),
        "03_random.JPEG": np.random.default_rng(0).bytes(4000),
        "04_empty.JPEG": b"",
        "05_cmyk.JPEG": _encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0))),
        "06_gray.JPEG": _encode(Image.new("L", (80, 60), 100)),
        "07_png.JPEG": _encode(Image.new("RGB", (80, 60), (10, 200, 30)), "PNG"),
        "08_realgray.JPEG": _real_gray().read_bytes(),
        "09_good.JPEG": real[2].read_bytes(),
        "10_truncated_last.JPEG": truncated[: len(truncated) // 3],
    }
    for name, data in files.items():
        (cls / name).write_bytes(data)
    return tmp_path / "data", sorted(files)


def test_crop_dataset_skips_bad_files(tmp_path, capsys):
    root, names = _bad_folder(tmp_path)
    source = FolderSource(root)
    assert [Path(f).name for f in source.files] == names
    ds = CropDataset(source, 24, seed=0)

    expect = {  # requested index -> (returned index, skipped)
        0: (0, 0),
        1: (2, 1),  # truncated -> next
        3: (5, 2),  # random bytes, empty -> CMYK
        4: (5, 1),
        10: (0, 1),  # the last file is bad: wraps to the first
    }
    for i, (j, skipped) in expect.items():
        s = ds[(0, i)]
        assert (s["index"], s["skipped"]) == (j, skipped), i
        assert s["image"].shape == (3, 24, 24) and s["image"].dtype == torch.uint8
        # a replacement is cropped with randomness of its own slot, so it does not duplicate
        # file j's own sample of this epoch; it is still deterministic
        if skipped:
            assert not torch.equal(s["box"], ds[(0, j)]["box"])
        assert torch.equal(s["image"], ds[(0, i)]["image"])
    for i in (5, 6, 7, 8):  # CMYK, grayscale, PNG-in-.JPEG, real grayscale: converted, not skipped
        s = ds[(0, i)]
        assert s["index"] == i and s["skipped"] == 0
        assert s["image"].shape == (3, 24, 24) and s["image"].dtype == torch.uint8
    assert torch.all(ds[(0, 7)]["image"] == torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1))
    assert capsys.readouterr().err.count("skipping unreadable") >= 1

    batch = collate([ds[(0, i)] for i in range(len(source))])
    # bad files are 1, 3, 4, 10; each request skips until the next good one
    assert batch["skipped"].item() == 1 + 2 + 1 + 1
    assert batch["skipped"].dtype == torch.int64 and batch["skipped"].shape == ()
    assert batch["index"].tolist() == [0, 2, 2, 5, 5, 5, 6, 7, 8, 9, 0]


def test_crop_dataset_missing_file_is_skipped(tmp_path):
    cls = tmp_path / "c"
    cls.mkdir()
    for p in _real_jpegs(2):
        shutil.copy(p, cls / p.name)
    source = FolderSource(tmp_path)
    (source.root / source.files[0]).unlink()  # vanished after listing (OSError on read)
    s = CropDataset(source, 16)[(0, 0)]
    assert (s["index"], s["skipped"]) == (1, 1)


def test_crop_dataset_too_many_bad_in_a_row(tmp_path):
    cls = tmp_path / "c"
    cls.mkdir()
    good = _real_jpegs(1)[0].read_bytes()
    (cls / "0.JPEG").write_bytes(good)
    for k in range(1, 5):
        (cls / f"{k}.JPEG").write_bytes(b"not an image %d" % k)
    (cls / "5.JPEG").write_bytes(good)
    source = FolderSource(tmp_path)

    # exactly max_bad in a row is still fine
    s = CropDataset(source, 16, max_bad_in_a_row=4)[(0, 1)]
    assert (s["index"], s["skipped"]) == (5, 4)
    with pytest.raises(RuntimeError, match=r"4 unreadable files in a row .*1\.JPEG.*data\.path"):
        CropDataset(source, 16, max_bad_in_a_row=3)[(0, 1)]


# ----------------------------------------------------------------------------------------------
# build_loader


def _check_contract(batch: dict, b: int, s: int) -> None:
    assert set(batch) == {"image", "box", "flip", "index", "label", "skipped", "converted"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (b, 3, s, s)
    assert batch["box"].dtype == torch.float32 and batch["box"].shape == (b, 4)
    box = batch["box"]
    assert torch.all((box >= 0) & (box <= 1))
    assert torch.all(box[:, 0] < box[:, 2]) and torch.all(box[:, 1] < box[:, 3])
    assert batch["flip"].dtype == torch.bool and batch["flip"].shape == (b,)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (b,)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (b,)
    assert batch["skipped"].dtype == torch.int64 and batch["skipped"].shape == ()


def _folder_cfg(tmp_path: Path) -> DataConfig:
    files = _real_jpegs(22)
    for i, p in enumerate(files):
        d = tmp_path / "imnet" / "train" / f"cls{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    shutil.copy(_real_gray(), tmp_path / "imnet" / "train" / "cls0" / "zz_gray.JPEG")
    (tmp_path / "imnet" / "train" / "cls1" / "zz_bad.JPEG").write_bytes(b"garbage")
    return DataConfig(source="folder", path=str(tmp_path / "imnet"), split="train")


@pytest.mark.parametrize("kind", ["folder", "synthetic"])
def test_build_loader_workers_do_not_change_batches(tmp_path, kind):
    if kind == "folder":
        base = _folder_cfg(tmp_path)
    else:
        base = DataConfig(source="synthetic", synthetic_count=40, synthetic_size=48)
    size, micro, nb = 32, 3, 5
    out = {}
    for workers in (0, 2):
        cfg = DataConfig(**{**base.__dict__, "num_workers": workers})
        loader, sampler = build_loader(cfg, img_size=size, micro_batch=micro, rank=1, world_size=2, seed=4, start_micro_batch=1)
        assert sampler.world == 2 and sampler.rank == 1 and sampler.start == 1
        it = iter(loader)
        out[workers] = [next(it) for _ in range(nb)]
        del it
    n = 24 if kind == "folder" else 40
    for b0, b2 in zip(out[0], out[2]):
        _check_contract(b0, micro, size)
        for k in b0:
            assert torch.equal(b0[k], b2[k]), k
        assert torch.all((b0["index"] >= 0) & (b0["index"] < n))
    # the batches are the sampler's keys (unless a bad file moved a sample on)
    ref = ShardedBatchSampler(n, micro, 1, 2, seed=4, start=1)
    ref_it = iter(ref)
    for b in out[0]:
        keys = next(ref_it)
        if b["skipped"].item() == 0:
            assert b["index"].tolist() == [i for _, i in keys]
    assert len({tuple(b["index"].tolist()) for b in out[0]}) == nb


def test_build_loader_folder_labels_and_skips(tmp_path):
    cfg = _folder_cfg(tmp_path)
    cfg.num_workers = 0
    source = FolderSource(cfg.path, cfg.split)
    loader, sampler = build_loader(cfg, img_size=16, micro_batch=4, rank=0, world_size=1, seed=0)
    it = iter(loader)
    total_skipped = 0
    for _ in range(len(sampler)):  # one full epoch
        b = next(it)
        _check_contract(b, 4, 16)
        assert b["label"].tolist() == [source.label(i) for i in b["index"].tolist()]
        total_skipped += b["skipped"].item()
    bad = source.files.index("cls1/zz_bad.JPEG")
    keys = [i for i in sampler.epoch_indices(0).tolist()[: len(sampler) * 4]]
    assert total_skipped == keys.count(bad)


def test_build_loader_start_matches_skip():
    cfg = DataConfig(source="synthetic", synthetic_count=30, synthetic_size=40, num_workers=0)
    full, _ = build_loader(cfg, img_size=16, micro_batch=4, rank=0, world_size=1, seed=1)
    resumed, _ = build_loader(cfg, img_size=16, micro_batch=4, rank=0, world_size=1, seed=1, start_micro_batch=9)
    a = iter(full)
    for _ in range(9):
        next(a)
    b = iter(resumed)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_build_loader_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cfg = DataConfig(source="synthetic", synthetic_count=16, synthetic_size=32, num_workers=0)
    loader, _ = build_loader(cfg, img_size=16, micro_batch=4, rank=0, world_size=1, seed=0)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)

"""data.decode=nvjpeg on a CPU device: the device decoder's crops against the CPU decoder's, the same
samples, boxes and flips from both loaders, exact resume, bad files, and the configuration check."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mimscale.config import DataConfig, load_config
from mimscale.data import device_decode
from mimscale.data.crop import crop_bytes
from mimscale.data.device_decode import DeviceDecoder, Planned, check_available, pack, plan_bytes
from mimscale.data.loader import build_loader
from mimscale.data.streams import StreamPosition, build_source, open_stream
from mimscale.errors import ConfigError
from mimscale.trainer import Trainer
from tests.unit.data.test_wds_loader import _take

SHARED = Path("/work/shared/data/imagenet-sample/train")
CPU = torch.device("cpu")
# Mean absolute difference per pixel (0-255) between the two decoders' crops of the same boxes:
# measured 1.28 over the 1000 sample ImageNet JPEGs at 224 px (at most 3.8 for one image), almost
# all of it the IDCT (libjpeg's fast integer IDCT vs the accurate one torchvision uses: 0.16 without)
MEAN_TOLERANCE = 2.0
IMAGE_TOLERANCE = 5.0

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs the sample ImageNet JPEGs (../shared/data)")


def _jpegs(count: int, stride: int = 1) -> list[Path]:
    return sorted(SHARED.glob("*/*"))[::stride][:count]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """24 real JPEGs (3 classes of 8, grayscale ones among them) copied into an ImageNet layout."""
    root = tmp_path_factory.mktemp("imagenet")
    classes = sorted(p.name for p in SHARED.iterdir())[:3]
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
    for i, f in enumerate(_jpegs(24, stride=41)):
        shutil.copy(f, root / "train" / classes[i % 3] / f.name)
    return root


def _corrupt(data: bytes) -> bytes:
    """Valid header and end marker, entropy data libjpeg refuses (a second SOI inside the scan):
    only the decode itself finds it."""
    sos = data.index(b"\xff\xda")
    return data[:sos + 200] + b"\xff\xd8" + data[sos + 200:]


def _decode_one(item, size: int) -> torch.Tensor:
    return DeviceDecoder(size, CPU)(pack([item], ["x"]))[0]


def test_crops_match_the_cpu_decoder_within_tolerance():
    """Over real JPEGs: the same box and flip from the header alone, and pixels within the stated
    tolerance of crop_bytes (data.jpeg_idct fast, the default) at 224 px."""
    diffs, accurate = [], []
    for n, f in enumerate(_jpegs(80, stride=12)):
        data = f.read_bytes()
        planned = plan_bytes(data, np.random.default_rng([5, n]), 224)
        cpu = crop_bytes(data, np.random.default_rng([5, n]), 224)
        assert isinstance(planned, Planned), f
        assert planned.box == cpu.box and planned.flip == cpu.flip
        dev = _decode_one(planned, 224).permute(1, 2, 0).numpy().astype(np.float64)
        diffs.append(np.abs(dev - cpu.image).mean())
        accurate.append(np.abs(dev - crop_bytes(data, np.random.default_rng([5, n]), 224, fast_idct=False).image).mean())
    assert np.mean(diffs) < MEAN_TOLERANCE and max(diffs) < IMAGE_TOLERANCE, (np.mean(diffs), max(diffs))
    assert np.mean(diffs) > 0.1  # two decoders: were the same pixels compared, the test would prove nothing
    # with the same (accurate) IDCT on both sides, what is left is the resize's emulation of crop.py's
    assert np.mean(accurate) < 0.5, np.mean(accurate)


def test_resize_flips_and_keeps_the_region():
    img = torch.arange(3 * 40 * 60, dtype=torch.float32).remainder(251).to(torch.uint8).view(3, 40, 60)
    plain, mirrored = device_decode.resize_region(img, 20, False), device_decode.resize_region(img, 20, True)
    assert plain.shape == (3, 20, 20) and plain.dtype == torch.uint8
    assert torch.equal(mirrored, plain.flip(-1))


def _folder_cfg(path: Path, decode: str, workers: int) -> DataConfig:
    return DataConfig(source="folder", path=str(path), num_workers=workers, decode=decode)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_hold_the_cpu_decoders_samples(imagenet, workers):
    """Rank 1 of 2: per batch, the same ids, labels, boxes and flips as data.decode=cpu; the workers
    ship bytes (no pixels) and the device decode gives crops close to the CPU ones."""
    def batches(decode):
        loader, _ = build_loader(_folder_cfg(imagenet, decode, workers), img_size=64, micro_batch=3, rank=1, world_size=2, seed=7)
        it = iter(loader)
        return [next(it) for _ in range(5)]  # past one epoch (4 global batches of 6)

    decoder = DeviceDecoder(64, CPU)
    for cpu, dev in zip(batches("cpu"), batches("nvjpeg")):
        assert "image" not in dev and dev["jpeg"].dtype == torch.uint8 and len(dev["jpeg_names"]) == 3
        for key in ("index", "label", "box", "flip", "skipped"):
            assert torch.equal(cpu[key], dev[key]), key
        images = decoder(dev)
        assert images.shape == cpu["image"].shape
        assert (images.float() - cpu["image"].float()).abs().mean() < 2 * MEAN_TOLERANCE


def test_folder_resume_continues_the_same_stream(imagenet):
    cfg = _folder_cfg(imagenet, "nvjpeg", 0)
    full, _ = build_loader(cfg, img_size=32, micro_batch=4, rank=0, world_size=1, seed=2)
    resumed, _ = build_loader(cfg, img_size=32, micro_batch=4, rank=0, world_size=1, seed=2, start_micro_batch=5)
    it, rit = iter(full), iter(resumed)
    expected = [next(it) for _ in range(8)][5:]
    for e in expected:
        r = next(rit)
        for key in ("index", "box", "flip", "jpeg", "jpeg_offsets", "jpeg_region"):
            assert torch.equal(e[key], r[key]), key


@pytest.fixture(scope="module")
def shards(imagenet, tmp_path_factory) -> Path:
    from data_prep.wds import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(imagenet, "train", out, shard_size=5, workers=1, progress=False)
    return out


def _wds_cfg(path: Path, decode: str) -> DataConfig:
    return DataConfig(source="wds", path=str(path), num_workers=2, shuffle_buffer=6, decode=decode)


def test_wds_streams_match_the_cpu_decoder_and_resume_exactly(shards):
    """The WebDataset stream under data.decode=nvjpeg: the same samples, boxes and flips as the CPU
    decoder; stopped after m batches and restarted from the checkpointed cursors, it continues with
    the batches (bytes and crop plans) an uninterrupted stream gives."""
    index = build_source(_wds_cfg(shards, "cpu"))
    cpu = _take(open_stream(_wds_cfg(shards, "cpu"), index, img_size=32, micro_batch=4, rank=0, world_size=1, seed=3), 6)
    cfg = _wds_cfg(shards, "nvjpeg")
    dev = _take(open_stream(cfg, index, img_size=32, micro_batch=4, rank=0, world_size=1, seed=3), 6)
    decoder = DeviceDecoder(32, CPU)
    for c, d in zip(cpu, dev):
        for key in ("index", "label", "box", "flip", "cursor"):
            assert torch.equal(c[key], d[key]), key
        assert d["jpeg_names"][-1].startswith(d["shard"] + ":") and all(".tar:" in n for n in d["jpeg_names"])  # shard:key
        assert (decoder(d).float() - c["image"].float()).abs().mean() < 2 * MEAN_TOLERANCE
    m = 3
    pos = StreamPosition(2)
    for b in dev[:m]:
        pos.observe(dict(b))
    restored, _ = StreamPosition.restore(pos.state(), 2)
    again = _take(open_stream(cfg, index, img_size=32, micro_batch=4, rank=0, world_size=1, seed=3, start_micro_batch=m,
                              position=restored), 3)
    for e, r in zip(dev[m:], again):
        for key in ("index", "box", "flip", "jpeg", "jpeg_offsets"):
            assert torch.equal(e[key], r[key]), key


def test_files_the_device_does_not_take_are_cropped_or_skipped_in_the_worker(imagenet, tmp_path):
    """Truncated and garbage files: skipped in the worker and counted, as with data.decode=cpu
    (the same ids and skip counts); a PNG named .JPEG: cropped in the worker (converted), its row
    shipped as pixels."""
    root = tmp_path / "bad"
    shutil.copytree(imagenet, root)
    classes = sorted(p.name for p in (root / "train").iterdir())
    good = sorted((root / "train" / classes[0]).iterdir())[0].read_bytes()
    (root / "train" / classes[1] / "a_truncated.JPEG").write_bytes(good[:3000])
    (root / "train" / classes[2] / "a_garbage.JPEG").write_bytes(b"not an image" * 40)
    from PIL import Image

    Image.new("RGB", (90, 70), (200, 30, 30)).save(root / "train" / classes[0] / "a_png.JPEG", format="PNG")

    def epoch(decode):
        loader, sampler = build_loader(_folder_cfg(root, decode, 0), img_size=32, micro_batch=3, rank=0, world_size=1, seed=1)
        it = iter(loader)
        return [next(it) for _ in range(len(sampler))]

    cpu, dev = epoch("cpu"), epoch("nvjpeg")
    assert sum(int(b["skipped"]) for b in dev) == sum(int(b["skipped"]) for b in cpu) > 0
    assert sum(int(b["converted"]) for b in dev) == sum(int(b["converted"]) for b in cpu) == 1
    decoder = DeviceDecoder(32, CPU)
    for c, d in zip(cpu, dev):
        assert torch.equal(c["index"], d["index"]) and torch.equal(c["box"], d["box"])
        images = decoder(d)
        for row in d["cropped_at"].tolist():  # the worker's own crops pass through untouched
            assert torch.equal(images[row], c["image"][row])


def test_a_file_only_the_device_rejects_is_replaced_and_counted(capsys):
    """A JPEG whose header and end marker are fine but whose scan is not: its row repeats the
    batch's next good row (image, box, flip, index, label), skipped counts it, a warning names it."""
    files = _jpegs(3, stride=97)
    items = [plan_bytes(f.read_bytes(), np.random.default_rng(i), 48) for i, f in enumerate(files)]
    items[1] = plan_bytes(_corrupt(files[1].read_bytes()), np.random.default_rng(1), 48)
    assert isinstance(items[1], Planned)  # the worker cannot tell
    batch = {**pack(items, ["a.JPEG", "bad.JPEG", "c.JPEG"]), "index": torch.tensor([10, 11, 12]), "label": torch.tensor([0, 1, 2]),
             "skipped": torch.tensor(0)}
    box2 = batch["box"][2].clone()
    images = DeviceDecoder(48, CPU)(batch)
    assert int(batch["skipped"]) == 1
    assert batch["index"].tolist() == [10, 12, 12] and batch["label"].tolist() == [0, 2, 2]
    assert torch.equal(batch["box"][1], box2) and torch.equal(images[1], images[2])
    assert "bad.JPEG" in capsys.readouterr().err


def test_a_batch_the_device_cannot_decode_at_all_is_an_error_naming_its_files():
    f = _jpegs(1)[0]
    items = [plan_bytes(_corrupt(f.read_bytes()), np.random.default_rng(i), 32) for i in range(2)]
    batch = {**pack(items, ["shard-000001.tar:k1", "shard-000001.tar:k2"]), "index": torch.tensor([0, 1]), "label": torch.tensor([0, 0]),
             "skipped": torch.tensor(0)}
    with pytest.raises(RuntimeError, match="shard-000001.tar:k1.*shard-000001.tar:k2"):
        DeviceDecoder(32, CPU)(batch)
    # more rejected files in a row than data.max_bad_in_a_row, across batches: an error too
    good = plan_bytes(f.read_bytes(), np.random.default_rng(0), 32)
    decoder = DeviceDecoder(32, CPU, max_bad_in_a_row=2)
    decoder({**pack([good, items[0]], ["g", "b1"]), "index": torch.tensor([0, 1]), "label": torch.tensor([0, 0]), "skipped": torch.tensor(0)})
    with pytest.raises(RuntimeError, match="3 in a row"):
        decoder({**pack([items[0], items[1], good], ["b2", "b3", "g"]), "index": torch.tensor([0, 1, 2]),
                 "label": torch.tensor([0, 0, 0]), "skipped": torch.tensor(0)})


def test_trainer_to_device_decodes_jpeg_batches(imagenet):
    """Trainer.to_device on a data.decode=nvjpeg batch: images from the device decoder, meta from the batch."""
    loader, _ = build_loader(_folder_cfg(imagenet, "nvjpeg", 0), img_size=32, micro_batch=4, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    me = SimpleNamespace(device=CPU, decoder=DeviceDecoder(32, CPU), hooks=SimpleNamespace(host_inputs=lambda b: {}))
    images, meta = Trainer.to_device(me, batch)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(meta["index"], batch["index"]) and torch.equal(meta["box"], batch["box"])


def test_config_names_the_key_and_what_is_missing(monkeypatch):
    with pytest.raises(ConfigError, match="'data.decode'.*folder or wds"):
        load_config(None, ["data.decode=nvjpeg"])  # synthetic source: no JPEG files
    with pytest.raises(ConfigError, match="'data.decode'.*allowed values: cpu, nvjpeg"):
        load_config(None, ["data.decode=dali"])
    check_available("nvjpeg", "folder", CPU)  # the CPU device's decoder is there
    if not torch.cuda.is_available():  # this machine has no GPU path: the error says so
        with pytest.raises(ConfigError, match="'data.decode' = nvjpeg decodes on the training device cuda, but torch sees no CUDA device"):
            check_available("nvjpeg", "folder", torch.device("cuda"))
    import torchvision.io

    def no_decoder(*a, **k):  # what a torchvision built without its JPEG decoder (nvJPEG on a GPU) raises
        raise RuntimeError("decode_jpeg: torchvision not compiled with nvJPEG support\nframe #0 ...")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_decoder)
    with pytest.raises(ConfigError, match=r"'data.decode' = nvjpeg: torchvision cannot decode a JPEG on cpu \(RuntimeError: "
                                          r"decode_jpeg: torchvision not compiled with nvJPEG support\); it needs"):
        check_available("nvjpeg", "folder", CPU)
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    with pytest.raises(ConfigError, match="'data.decode' = nvjpeg needs torchvision.io.decode_jpeg"):
        check_available("nvjpeg", "wds", CPU)


def test_check_paths_checks_the_decoder_of_this_ranks_device(imagenet, monkeypatch):
    """config.check_paths (pretrain's machine checks): data.decode=nvjpeg is checked on the device the
    rank trains on; a CUDA device without the GPU decoder is refused naming data.decode."""
    from mimscale import config

    cfg = load_config(None, ["data.source=folder", f"data.path={imagenet}", "data.decode=nvjpeg"])
    monkeypatch.setattr(config.dist, "device", lambda: CPU)
    config.check_paths(cfg)
    if torch.cuda.is_available():
        return  # this machine has the GPU path; the refusal is what a machine without it gives
    monkeypatch.setattr(config.dist, "device", lambda: torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="'data.decode' = nvjpeg decodes on the training device cuda:0, but torch sees no CUDA"):
        config.check_paths(cfg)

"""Data pipeline: crop geometry, decode paths, bad-file handling, sharding and the loader contract."""
from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

import mimscale.data.crop as crop_mod
from mimscale.config import DataConfig
from mimscale.data.crop import RATIO, UnreadableImage, crop_array, crop_bytes, sample_box
from mimscale.data.loader import CropDataset, ShardedBatchSampler, build_loader, collate
from mimscale.data.sources import FolderSource, SyntheticSource

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample" / "train"
GRAY_REAL = "n02096051/n02096051_Airedale.JPEG"  # a real grayscale ("L") ImageNet JPEG


# ----------------------------------------------------------------------------------------------
# helpers


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
    """R encodes x, G encodes y (0..255 across the image), B constant."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.round(np.arange(width) * 255.0 / (width - 1))[None, :]
    a[..., 1] = np.round(np.arange(height) * 255.0 / (height - 1))[:, None]
    a[..., 2] = 128
    return a


def _waves(width: int, height: int, period: int = 64) -> np.ndarray:
    """Sinusoids along x (R) and y (G): detail that shows any misregistration of a few pixels."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.round(127.5 + 127 * np.sin(2 * np.pi * np.arange(width) / period))[None, :]
    a[..., 1] = np.round(127.5 + 127 * np.sin(2 * np.pi * np.arange(height) / period))[:, None]
    a[..., 2] = 128
    return a


def _expected_gradient_crop(box, width: int, height: int, size: int) -> np.ndarray:
    """The R, G values a crop of ``_gradient(width, height)`` at normalized ``box`` must show:
    output pixel j samples the source at x0 + (j + 0.5) * w / size (in pixel-edge coordinates)."""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    j = np.arange(size) + 0.5
    xs = x0 + j * (x1 - x0) / size - 0.5  # pixel-centre coordinates
    ys = y0 + j * (y1 - y0) / size - 0.5
    r = np.clip(xs, 0, width - 1) * 255.0 / (width - 1)
    g = np.clip(ys, 0, height - 1) * 255.0 / (height - 1)
    return np.stack([np.broadcast_to(r[None, :], (size, size)), np.broadcast_to(g[:, None], (size, size))], -1)


def _reference_crop(full: Image.Image, box, size: int) -> np.ndarray:
    w, h = full.size
    x0, y0, x1, y1 = box
    return np.asarray(full.resize((size, size), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h)), dtype=np.float64)


@pytest.fixture
def record_decodes(monkeypatch):
    """Record (original width, decoded width) of every simplejpeg decode crop_bytes does."""
    seen: list[tuple[int, int]] = []
    real = simplejpeg.decode_jpeg

    def wrapped(data, *args, **kwargs):
        arr = real(data, *args, **kwargs)
        _, width, _, _ = simplejpeg.decode_jpeg_header(data)
        seen.append((width, arr.shape[1]))
        return arr

    monkeypatch.setattr(crop_mod.simplejpeg, "decode_jpeg", wrapped)
    return seen


def _real_jpegs(n: int) -> list[Path]:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    files = sorted(SAMPLE.glob("*/*.JPEG"))
    assert len(files) >= n
    return files[:n]


def _real_gray() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    p = SAMPLE / GRAY_REAL
    assert Image.open(p).mode == "L"
    return p


# ----------------------------------------------------------------------------------------------
# sample_box


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (300, 300), (1000, 800), (64, 48)])
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0), (0.5, 0.6)])
def test_sample_box_inside_with_scale_and_aspect(width, height, scale):
    area = width * height
    boxes = set()
    for seed in range(300):
        x0, y0, w, h = sample_box(np.random.default_rng(seed), width, height, scale)
        for v in (x0, y0, w, h):
            assert isinstance(v, int)
        assert 0 <= x0 and 0 <= y0 and w > 0 and h > 0
        assert x0 + w <= width and y0 + h <= height
        # w and h are rounded from the drawn continuous values: allow half a pixel each way.
        assert (w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-9, (seed, w, h)
        assert (w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-9, (seed, w, h)
        assert (w - 0.5) / (h + 0.5) <= RATIO[1] + 1e-9, (seed, w, h)
        assert (w + 0.5) / (h - 0.5) >= RATIO[0] - 1e-9, (seed, w, h)
        boxes.add((x0, y0, w, h))
    assert len(boxes) > 100  # really random, not a constant fallback


def test_sample_box_same_seed_same_box():
    a = [sample_box(np.random.default_rng(7), 640, 480) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert sample_box(np.random.default_rng(8), 640, 480) != a[0]


@pytest.mark.parametrize(
    "width,height,expected",
    [
        # too wide for any 3/4..4/3 box of >= 20% area: centered box, 4/3 aspect, full height
        (1000, 10, ((1000 - 13) // 2, 0, 13, 10)),
        # too tall: full width, 3/4 aspect (h = round(w * 4 / 3)), centered vertically
        (10, 1000, (0, (1000 - 13) // 2, 10, 13)),
        (3000, 30, ((3000 - 40) // 2, 0, 40, 30)),
    ],
)
def test_sample_box_fallback_center_crop(width, height, expected):
    for seed in range(20):
        assert sample_box(np.random.default_rng(seed), width, height) == expected


def test_sample_box_fallback_when_scale_cannot_fit():
    # scale > what fits with any allowed aspect: every try fails -> the in-ratio image is used whole
    for seed in range(10):
        assert sample_box(np.random.default_rng(seed), 100, 100, scale=(1.5, 2.0)) == (0, 0, 100, 100)


# ----------------------------------------------------------------------------------------------
# crop_array / crop_bytes: the box is where the pixels came from


def _check_gradient_crop(crop, width: int, height: int, size: int, mean_tol: float, max_tol: float):
    x0, y0, x1, y1 = crop.box
    assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    assert crop.image.shape == (size, size, 3) and crop.image.dtype == np.uint8
    exp = _expected_gradient_crop(crop.box, width, height, size)
    got = crop.image[..., :2].astype(np.float64)
    err = np.abs(got - exp)
    # corners and centre, explicitly
    for i, j in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1), (size // 2, size // 2)]:
        assert err[i, j].max() <= max_tol, (crop.box, (i, j), got[i, j], exp[i, j])
    assert err.mean() <= mean_tol, (crop.box, err.mean())


def test_crop_array_box_matches_pixels():
    width, height, size = 256, 192, 32
    arr = _gradient(width, height)
    for seed in range(40):
        crop = crop_array(arr, np.random.default_rng(seed), size, hflip=0.0)
        assert crop.flip is False and crop.converted is False
        _check_gradient_crop(crop, width, height, size, mean_tol=1.0, max_tol=6.0)


def test_crop_array_does_not_modify_input_and_output_is_writable():
    arr = _gradient(128, 96)
    before = arr.copy()
    crop = crop_array(arr, np.random.default_rng(0), 16, hflip=1.0)
    assert np.array_equal(arr, before)
    assert crop.image.flags.writeable
    torch.from_numpy(crop.image)  # must not warn/fail on a read-only array


def test_crop_bytes_jpeg_box_matches_pixels_with_reduced_decode(record_decodes):
    width, height, size = 1024, 768, 32
    data = _encode(Image.fromarray(_gradient(width, height)), quality=95)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    assert full.size == (width, height)
    for seed in range(30):
        crop = crop_bytes(data, np.random.default_rng(seed), size, hflip=0.0)
        assert crop.converted is False  # decoded by simplejpeg, not the PIL fallback
        _check_gradient_crop(crop, width, height, size, mean_tol=1.5, max_tol=6.0)
        ref = _reference_crop(full, crop.box, size)
        assert np.abs(crop.image - ref).mean() < 1.5, crop.box
    assert len(record_decodes) == 30
    assert all(dec < w for w, dec in record_decodes), "reduced-size IDCT decode was never used"
    assert any(dec * 8 == w for w, dec in record_decodes), record_decodes  # 1/8 scale reached


@pytest.mark.parametrize("width,height", [(1024, 768), (1025, 769), (500, 375), (500, 333)])
def test_crop_bytes_reduced_decode_registers_detail_with_full_decode(width, height, record_decodes):
    """Reduced-size decodes must map the box with the IDCT's exact scale (M/8), including for
    sizes that are not multiples of 8 (500x375 and 500x333 are typical ImageNet sizes): libjpeg
    rounds the reduced size up, so decoded_width / width overstates the scale."""
    size = 32
    data = _encode(Image.fromarray(_waves(width, height)), quality=95)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    diffs = []
    for seed in range(30):
        crop = crop_bytes(data, np.random.default_rng(seed), size, hflip=0.0)
        diffs.append(np.abs(crop.image - _reference_crop(full, crop.box, size)).mean())
    assert any(dec < w for w, dec in record_decodes)
    # aligned crops give 1.5-5 (cv2's area/bicubic filters vs PIL's anti-aliased bicubic on a wave
    # near the output's Nyquist rate); a misregistration of a few pixels on a 64-pixel-period
    # wave gives 10-35.
    assert max(diffs) < 6.5, f"crop vs full-resolution decode, worst mean abs diff {max(diffs):.1f} (all: {np.round(diffs, 1)})"


def test_crop_bytes_full_scale_when_crop_needs_it(record_decodes):
    # a small image: the crop needs every pixel, so no reduced decode
    width, height, size = 96, 80, 64
    data = _encode(Image.fromarray(_gradient(width, height)), quality=95)
    for seed in range(5):
        crop = crop_bytes(data, np.random.default_rng(seed), size, hflip=0.0)
        _check_gradient_crop(crop, width, height, size, mean_tol=2.0, max_tol=8.0)
    assert all(dec == w for w, dec in record_decodes)


def test_crop_bytes_png_path_box_matches_pixels():
    width, height, size = 256, 192, 32
    data = _encode(Image.fromarray(_gradient(width, height)), "PNG")
    for seed in range(10):
        crop = crop_bytes(data, np.random.default_rng(seed), size, hflip=0.0)
        assert crop.converted is True
        _check_gradient_crop(crop, width, height, size, mean_tol=1.0, max_tol=6.0)


def test_crop_bytes_and_crop_array_agree_on_box_and_flip():
    # same rng draws for the same image size, whichever path decodes it; a reduced-size JPEG decode
    # rounds the box to its own pixels (at most 8 original pixels at scale 1/8) and reports that box
    arr = _gradient(200, 150)
    png = _encode(Image.fromarray(arr), "PNG")
    jpg = _encode(Image.fromarray(arr), quality=95)
    reduced = 0
    for seed in range(10):
        a = crop_array(arr, np.random.default_rng(seed), 24)
        b = crop_bytes(png, np.random.default_rng(seed), 24)
        c = crop_bytes(jpg, np.random.default_rng(seed), 24)
        assert a.box == b.box
        assert np.allclose(a.box, c.box, atol=8 / 150 + 1e-9)
        reduced += a.box != c.box
        assert a.flip == b.flip == c.flip
        assert np.array_equal(a.image, b.image)  # PNG is lossless and goes through the same resize
        if a.box == c.box:
            assert np.abs(a.image.astype(int) - c.image).mean() < 2.0
        else:  # compare with what c's own box must show
            exp = _expected_gradient_crop(c.box, 200, 150, 24)
            got = (c.image[:, ::-1] if c.flip else c.image)[..., :2].astype(np.float64)
            assert np.abs(got - exp).mean() < 3.0
    assert reduced > 0  # the reduced-decode path was exercised


# ----------------------------------------------------------------------------------------------
# flip


@pytest.mark.parametrize("path", ["array", "jpeg", "png"])
def test_flip_is_mirror_of_unflipped_crop(path):
    arr = _gradient(300, 200)
    src = {"array": arr, "jpeg": _encode(Image.fromarray(arr), quality=95), "png": _encode(Image.fromarray(arr), "PNG")}[path]
    fn = crop_array if path == "array" else crop_bytes
    for seed in range(10):
        a = fn(src, np.random.default_rng(seed), 32, hflip=0.0)
        b = fn(src, np.random.default_rng(seed), 32, hflip=1.0)
        assert a.flip is False and b.flip is True
        assert a.box == b.box
        assert np.array_equal(b.image, a.image[:, ::-1])
        # and the mirror really is a mirror: red (x) decreases left to right
        assert b.image[16, 0, 0] > b.image[16, -1, 0]


def test_flip_probability_roughly_half():
    arr = _gradient(64, 64)
    flips = [crop_array(arr, np.random.default_rng(s), 8).flip for s in range(400)]
    assert 140 < sum(flips) < 260


# ----------------------------------------------------------------------------------------------
# decode of odd files


def test_crop_bytes_odd_formats_become_rgb():
    rng = np.random.default_rng(0)
    gray = crop_bytes(_encode(Image.new("L", (100, 80), 77)), rng, 16)
    assert gray.image.shape == (16, 16, 3) and gray.image.dtype == np.uint8
    assert np.abs(gray.image.astype(int) - 77).max() <= 2

    cmyk = crop_bytes(_encode(Image.new("CMYK", (100, 80), (0, 255, 255, 0))), rng, 16)
    assert cmyk.converted is True
    assert cmyk.image.shape == (16, 16, 3) and cmyk.image.dtype == np.uint8
    assert np.abs(cmyk.image.astype(int) - [255, 0, 0]).max() <= 8  # C=0 M=Y=255 K=0 is red

    png = crop_bytes(_encode(Image.new("RGB", (100, 80), (10, 200, 30)), "PNG"), rng, 16)
    assert png.converted is True
    assert np.array_equal(png.image, np.broadcast_to(np.array([10, 200, 30], np.uint8), (16, 16, 3)))

    pal = crop_bytes(_encode(Image.new("RGB", (50, 50), (0, 0, 255)).convert("P"), "PNG"), rng, 16)
    assert pal.image.shape == (16, 16, 3) and np.abs(pal.image.astype(int) - [0, 0, 255]).max() <= 2

    rgba = crop_bytes(_encode(Image.new("RGBA", (50, 50), (9, 8, 7, 100)), "PNG"), rng, 16)
    assert rgba.image.shape == (16, 16, 3)


def test_crop_bytes_real_grayscale_jpeg():
    data = _real_gray().read_bytes()
    crop = crop_bytes(data, np.random.default_rng(0), 32)
    assert crop.image.shape == (32, 32, 3) and crop.image.dtype == np.uint8
    assert np.array_equal(crop.image[..., 0], crop.image[..., 1])
    assert np.array_equal(crop.image[..., 0], crop.image[..., 2])
    assert crop.image.std() > 1  # real content, not a blank


def test_crop_bytes_unreadable():
    real = _real_jpegs(1)[0].read_bytes()
    noise = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(noise), "PNG")
    assert len(png) > 10000
    bad = {
        "truncated": real[: len(real) // 2],
        "empty": b"",
        "random": np.random.default_rng(1).bytes(5000),
        "soi_then_garbage": b"\xff\xd8" + np.random.default_rng(2).bytes(3000),
        "png_truncated": png[: len(png) // 2],
    }
    for name, data in bad.items():
        with pytest.raises(UnreadableImage):
            crop_bytes(data, np.random.default_rng(0), 16)
            pytest.fail(f"{name}: decoded without error")


def test_crop_bytes_corrupt_scan_data_is_unreadable():
    real = bytearray(_real_jpegs(1)[0].read_bytes())
    rng = np.random.default_rng(3)
    for p in rng.integers(len(real) // 3, 2 * len(real) // 3, 50):
        real[p] = int(rng.integers(0, 256))
    with pytest.raises(UnreadableImage):
        crop_bytes(bytes(real), np.random.default_rng(0), 224, scale=(1.0, 1.0))


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
# ShardedBatchSampler


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("n,batch", [(41, 4), (45, 4), (40, 5), (7, 3)])
def test_sampler_two_ranks_disjoint_and_cover(n, batch):
    world = 2
    samplers = [ShardedBatchSampler(n, batch, r, world, seed=3) for r in range(world)]
    per_rank = n // world
    bpe = per_rank // batch
    assert all(len(s) == bpe for s in samplers)
    its = [iter(s) for s in samplers]
    orders = []
    for epoch in range(4):
        idx = [s.epoch_indices(epoch).tolist() for s in samplers]
        assert len(idx[0]) == len(idx[1]) == per_rank
        assert not set(idx[0]) & set(idx[1])
        assert len(set(idx[0]) | set(idx[1])) == per_rank * world == (n // 2) * 2
        assert all(0 <= i < n for i in idx[0] + idx[1])
        batches = [_take(it, bpe) for it in its]
        for r in range(world):
            keys = [k for b in batches[r] for k in b]
            assert all(len(b) == batch for b in batches[r])
            assert all(e == epoch for e, _ in keys)
            assert [i for _, i in keys] == idx[r][: bpe * batch]  # whole batches, in order
        seen0 = {i for b in batches[0] for _, i in b}
        seen1 = {i for b in batches[1] for _, i in b}
        assert not seen0 & seen1
        orders.append(idx[0] + idx[1])
    assert len({tuple(o) for o in orders}) == 4  # each epoch a different order


def test_sampler_seed_changes_order_and_no_shuffle_is_arange():
    a = ShardedBatchSampler(50, 5, seed=0).epoch_indices(0).tolist()
    b = ShardedBatchSampler(50, 5, seed=11).epoch_indices(0).tolist()
    assert a != b and sorted(a) == sorted(b) == list(range(50))
    s = ShardedBatchSampler(10, 2, rank=1, world_size=2, shuffle=False)
    assert s.epoch_indices(0).tolist() == [1, 3, 5, 7, 9]
    assert next(iter(s)) == [(0, 1), (0, 3)]


@pytest.mark.parametrize("k", [0, 1, 4, 5, 6, 13, 27])
def test_sampler_start_equals_skip(k):
    for rank in (0, 1):
        ref = iter(ShardedBatchSampler(23, 2, rank, 2, seed=9))  # 11 per rank, 5 batches/epoch
        for _ in range(k):
            next(ref)
        resumed = iter(ShardedBatchSampler(23, 2, rank, 2, seed=9, start=k))
        assert _take(resumed, 12) == _take(ref, 12)


def test_sampler_position():
    s = ShardedBatchSampler(23, 2, 0, 2)  # 5 batches per epoch
    assert s.batches_per_epoch == 5
    assert [s.position(k) for k in (0, 1, 4, 5, 9, 10, 27)] == [(0, 0), (0, 1), (0, 4), (1, 0), (1, 4), (2, 0), (5, 2)]
    # and the k-th batch yielded really is at that (epoch, batch) position
    it = iter(s)
    for k in range(12):
        b = next(it)
        e, j = s.position(k)
        assert b == [(e, i) for i in s.epoch_indices(e).tolist()[j * 2 : (j + 1) * 2]]


def test_sampler_too_few_samples():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ShardedBatchSampler(7, 4, 0, 2)


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
        loader, sampler = build_loader(cfg, size, micro, rank=1, world_size=2, seed=4, start_micro_batch=1)
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
    loader, sampler = build_loader(cfg, 16, 4, rank=0, world_size=1, seed=0)
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
    full, _ = build_loader(cfg, 16, 4, rank=0, world_size=1, seed=1)
    resumed, _ = build_loader(cfg, 16, 4, rank=0, world_size=1, seed=1, start_micro_batch=9)
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
    loader, _ = build_loader(cfg, 16, 4, rank=0, world_size=1, seed=0)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# sources


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
    _touch_tree(tmp_path / "train", {"a": ["1.JPEG"]})
    _touch_tree(tmp_path / "val", {"a": ["1.JPEG", "2.JPEG"], "b": ["3.JPEG"]})
    assert len(FolderSource(tmp_path, "val")) == 3
    assert len(FolderSource(tmp_path)) == 1


def test_folder_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        FolderSource(tmp_path / "empty")
    _touch_tree(tmp_path / "noimg" / "train", {"a": ["x.txt"], "b": []})
    with pytest.raises(FileNotFoundError, match="no images"):
        FolderSource(tmp_path / "noimg")


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

"""mimscale.data.crop: RandomResizedCrop geometry, the box vs the pixels, reduced decodes, flips,
odd and unreadable files; mimscale.data.eval_transform: the evaluation resize + center crop."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mimscale.data.crop as crop_mod
from mimscale.data.crop import RATIO, UnreadableImage, crop_array, crop_bytes, sample_box
from mimscale.data.eval_transform import center_crop, center_offset, resize_size, resized_shape

SAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "imagenet-sample" / "train"
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
    """Record (original width, decoded width) of every JPEG decode crop_bytes does."""
    seen: list[tuple[int, int]] = []
    real = crop_mod._decode_jpeg

    def wrapped(data, m, span, width, height, fast):
        seen.append((width, -(-width * m // 8)))
        return real(data, m, span, width, height, fast)

    monkeypatch.setattr(crop_mod, "_decode_jpeg", wrapped)
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
        assert crop.converted is False  # decoded by libjpeg, not the PIL fallback
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
# the evaluation transform (mimscale.data.eval_transform): short side to round(S / crop_pct),
# bicubic, center S x S. References are PIL's own resize + crop with the numbers written out.


def test_eval_transform_of_a_300x200_image_is_pils_resize_then_center_crop():
    """224 / 0.875 = 256: 300x200 -> 384x256, center 224 x 224 at (80, 16); portrait alike."""
    for (w, h), resized, offset in (((300, 200), (384, 256), (80, 16)), ((200, 300), (256, 384), (16, 80))):
        arr = _waves(w, h, period=23)
        img = Image.fromarray(arr)
        ref = np.asarray(img.resize(resized, Image.BICUBIC).crop((*offset, offset[0] + 224, offset[1] + 224)))
        from_array = center_crop(arr, 224)
        assert from_array.image.shape == (224, 224, 3) and from_array.image.dtype == np.uint8
        assert np.array_equal(from_array.image, ref)
        assert from_array.box == (offset[0] / resized[0], offset[1] / resized[1],
                                  (offset[0] + 224) / resized[0], (offset[1] + 224) / resized[1])
        assert not from_array.flip and not from_array.converted
        png = _encode(img, "PNG")  # lossless: the decoded pixels are arr's
        assert np.array_equal(center_crop(png, 224).image, ref) and center_crop(png, 224).converted
        jpg = _encode(img, quality=90)
        decoded = Image.open(io.BytesIO(jpg)).convert("RGB")
        from_jpeg = center_crop(jpg, 224)
        assert np.array_equal(from_jpeg.image, np.asarray(decoded.resize(resized, Image.BICUBIC).crop(
            (*offset, offset[0] + 224, offset[1] + 224))))
        assert not from_jpeg.converted


def test_eval_transform_sizes_follow_torchvision():
    """Resize(R) truncates the long side; CenterCrop rounds its offsets; crop_pct 1 keeps the short side."""
    assert resize_size(224) == 256 and resize_size(32) == 37 and resize_size(224, 1.0) == 224 and resize_size(384, 0.75) == 512
    assert resized_shape(97, 61, 37) == (58, 37)  # 37 * 97 / 61 = 58.8 -> 58
    assert resized_shape(61, 97, 37) == (37, 58)
    assert center_offset(58, 37, 32) == (13, 2)  # round(2.5) = 2, as torchvision's int(round(...))
    arr = _gradient(97, 61)
    ref = np.asarray(Image.fromarray(arr).resize((58, 37), Image.BICUBIC).crop((13, 2, 45, 34)))
    assert np.array_equal(center_crop(arr, 32).image, ref)
    whole_short = center_crop(arr, 61, crop_pct=1.0)  # no resize: the central 61 x 61
    assert np.array_equal(whole_short.image, arr[:, 18:79])
    for bad in (0, 1.5, -0.1, "x"):
        with pytest.raises(ValueError, match="crop_pct"):
            center_crop(arr, 32, crop_pct=bad)


def test_eval_transform_converts_odd_modes_and_rejects_unreadable_bytes():
    gray = Image.fromarray(_gradient(80, 60)[..., 0])
    out = center_crop(_encode(gray, quality=95), 32)
    assert out.image.shape == (32, 32, 3) and not out.converted  # a gray JPEG is a plain one
    assert np.array_equal(out.image[..., 0], out.image[..., 2])
    cmyk = Image.fromarray(_gradient(80, 60)).convert("CMYK")
    assert center_crop(_encode(cmyk, quality=95), 32).converted
    with pytest.raises(UnreadableImage):
        center_crop(b"\xff\xd8" + np.random.default_rng(2).bytes(3000), 32)


def test_eval_transform_decodes_real_jpegs_to_pils_pixels():
    """simplejpeg's full-size decode (the fast path) gives PIL's pixels, colour and gray ImageNet files alike."""
    for path in [*_real_jpegs(40), _real_gray()]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            ref = np.asarray(img.convert("RGB").resize(resized_shape(*img.size, 256), Image.BICUBIC))
        left, top = center_offset(ref.shape[1], ref.shape[0], 224)
        assert np.array_equal(center_crop(data, 224).image, ref[top:top + 224, left:left + 224]), path.name

"""The partial JPEG decoder (mimscale/data/_jpeg_region.c via jpeg_region.py): built by make setup,
equal to a full decode over the box it was asked for, and a drop-in for crop_bytes."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from mimscale.data import crop as crop_mod
from mimscale.data import jpeg_region
from mimscale.data.crop import crop_bytes, sample_box

SAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "imagenet-sample" / "train"


def _real(n: int) -> list[bytes]:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} not present")
    files = sorted(SAMPLE.glob("*/*.JPEG"))[:n]
    assert len(files) == n
    return [f.read_bytes() for f in files]


def _waves(width: int, height: int) -> np.ndarray:
    """Detail in every channel and both directions: any misplaced or re-filtered pixel shows."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    r = 127 + 120 * np.sin(x / 3.1) * np.cos(y / 5.3)
    g = 127 + 120 * np.cos(x / 7.7 + y / 2.9)
    b = (x * 7 + y * 13) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def _encode(arr: np.ndarray, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def test_extension_is_built():
    """make setup builds it (setup.py, libjpeg-dev from scripts/system_deps.sh); without it crops stay
    correct but cost ~25% more decode time, so a broken build must not pass silently. A machine
    without jpeglib.h (a non-root install system_deps.sh let go on) is not expected to have it."""
    cc = subprocess.run(["cc", "-E", "-x", "c", "-"], input="#include <stdio.h>\n#include <jpeglib.h>\n", capture_output=True,
                        text=True)
    if cc.returncode != 0:
        pytest.skip("no jpeglib.h here: the extension is optional")
    assert jpeg_region.available(), "mimscale/data/_jpeg_region was not built: see setup.py"


def _check_equal_to_full_decode(data: bytes, rng: np.random.Generator, m: int) -> None:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    aw, ah = -(-width * m // 8), -(-height * m // 8)
    full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=aw, min_height=ah)
    assert full.shape[:2] == (ah, aw)
    x0, y0, w, h = sample_box(rng, aw, ah, scale=(0.05, 1.0))
    region, rx, ry = jpeg_region.decode_region(data, m, x0, y0, x0 + w, y0 + h)
    assert region is not None
    # the region covers the box, rows exactly, columns possibly widened to whole iMCUs
    assert ry == y0 and region.shape[0] == h
    assert rx <= x0 and rx + region.shape[1] >= x0 + w
    got = region[:, x0 - rx:x0 - rx + w]
    assert np.array_equal(got, full[y0:y0 + h, x0:x0 + w]), (m, (x0, y0, w, h), np.abs(got.astype(int) - full[y0:y0 + h, x0:x0 + w]).max())


@pytest.mark.parametrize("m", [8, 4, 2, 1])
def test_region_equals_full_decode_on_real_jpegs(m):
    rng = np.random.default_rng(m)
    for data in _real(60):
        _check_equal_to_full_decode(data, rng, m)


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("width,height", [(333, 250), (257, 129), (64, 48)])
def test_region_equals_full_decode_for_each_subsampling_and_odd_size(subsampling, width, height):
    data = _encode(_waves(width, height), subsampling)
    rng = np.random.default_rng(width + subsampling)
    for m in (8, 4, 2):
        for _ in range(10):
            _check_equal_to_full_decode(data, rng, m)


def test_gray_jpeg_decodes_to_equal_rgb_channels():
    data = io.BytesIO()
    Image.fromarray(_waves(120, 90)[..., 0]).save(data, "JPEG", quality=90)
    region, rx, ry = jpeg_region.decode_region(data.getvalue(), 8, 10, 20, 70, 80)
    assert region is not None and region.shape[0] == 60
    assert np.array_equal(region[..., 0], region[..., 1]) and np.array_equal(region[..., 0], region[..., 2])
    full = simplejpeg.decode_jpeg(data.getvalue(), colorspace="RGB")
    assert np.array_equal(region[:, 10 - rx:70 - rx], full[20:80, 10:70])


def test_unusable_files_return_none():
    good = _encode(_waves(200, 150), 2)
    cmyk = io.BytesIO()
    Image.fromarray(_waves(80, 60)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    assert jpeg_region.decode_region(cmyk.getvalue(), 8, 0, 0, 40, 40)[0] is None  # needs PIL's conversion
    assert jpeg_region.decode_region(b"\xff\xd8" + bytes(500), 8, 0, 0, 40, 40)[0] is None  # garbage
    # truncated in the middle of the crop's rows: a warning, which strict mode turns into a failure
    assert jpeg_region.decode_region(good[: len(good) // 2], 8, 0, 100, 200, 150)[0] is None
    assert jpeg_region.decode_region(good[: len(good) // 2], 8, 0, 100, 200, 150, strict=False)[0] is not None
    # truncated below the crop (rows never read): refused like a full decode refuses it
    assert jpeg_region.decode_region(good[:-200], 8, 0, 0, 50, 20)[0] is None
    assert jpeg_region.decode_region(good[:-200], 8, 0, 0, 50, 20, strict=False)[0] is not None
    assert jpeg_region.decode_region(good + bytes(20), 8, 0, 0, 50, 20)[0] is not None  # padding after the end marker
    # the box outside the image
    assert jpeg_region.decode_region(good, 8, 300, 0, 400, 10)[0] is None


def test_crop_bytes_gives_the_same_crops_with_and_without_the_extension(monkeypatch):
    """Boxes, flips and pixels: the extension only changes how much is decoded."""
    datas = _real(40)
    with_ext = [crop_bytes(d, np.random.default_rng(i), 224) for i, d in enumerate(datas)]
    whole_with = [crop_bytes(d, np.random.default_rng(i), 224, scale=None) for i, d in enumerate(datas[:10])]
    monkeypatch.setattr(jpeg_region, "FUNCTION", None)
    monkeypatch.setattr(jpeg_region, "_warned", True)
    decodes = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(crop_mod.simplejpeg, "decode_jpeg", lambda *a, **k: decodes.append(1) or real(*a, **k))
    without = [crop_bytes(d, np.random.default_rng(i), 224) for i, d in enumerate(datas)]
    whole_without = [crop_bytes(d, np.random.default_rng(i), 224, scale=None) for i, d in enumerate(datas[:10])]
    assert len(decodes) >= 45  # the fallback really ran (PIL-converted files do not count)
    for a, b in zip(with_ext + whole_with, without + whole_without):
        assert a.box == b.box and a.flip == b.flip and a.converted == b.converted
        assert np.array_equal(a.image, b.image)


def test_a_too_small_buffer_is_refused_with_the_image_size():
    """The C side never writes past out_cap; it reports the scaled size so a caller can retry."""
    import ctypes

    data = _encode(_waves(200, 150), 2)
    info = np.zeros(jpeg_region.INFO, np.int32)
    buf = np.empty(10, np.uint8)
    rc = jpeg_region.FUNCTION(data, len(data), 4, 0, 0, 100, 75, buf.ctypes.data, buf.size, 0, 1, info.ctypes.data)
    assert rc == jpeg_region.CAPACITY and tuple(info[4:]) == (100, 75)
    assert ctypes.sizeof(ctypes.c_int) == 4  # info is int32 on the C side


def test_an_unloadable_build_falls_back(monkeypatch, tmp_path):
    bad = tmp_path / "_jpeg_region.so"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(jpeg_region.importlib.util, "find_spec", lambda name: type("Spec", (), {"origin": str(bad)})())
    assert jpeg_region._load() is None

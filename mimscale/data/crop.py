"""RandomResizedCrop computed as a box first, then a decode of only as many pixels as it needs.

The box is drawn before decoding so (a) JPEGs can be decoded at 1/2, 1/4, 1/8 scale inside the
IDCT when the crop allows it, and only over the rows and columns the crop covers (jpeg_region.py),
and (b) the box and flip
are reported with the image, in original-image coordinates, for methods that align per-image
side information (AMT's attention maps) with the crop.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from mimscale.data import jpeg_region

RATIO = (3.0 / 4.0, 4.0 / 3.0)
# The "box" of scale=None: the whole image, whatever size a reduced decode gives it.
WHOLE = (0, 0, None, None)


class UnreadableImage(Exception):
    """The bytes are not an image we can decode (corrupt, truncated, unknown format)."""


@dataclass
class Crop:
    image: np.ndarray  # [S, S, 3] uint8 RGB
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) / (W, H) of the original image
    flip: bool
    converted: bool  # the file needed a fallback conversion (CMYK, PNG-in-.JPEG, odd mode)


def sample_box(rng: np.random.Generator, width: int, height: int, scale=(0.2, 1.0), ratio=RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (x0, y0, w, h) in pixels: area fraction ~ U(scale), log aspect
    ~ U(log ratio), 10 tries, then a center crop clamped to the ratio range (torchvision's rule)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_r[0], log_r[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_scale(w: int, h: int, size: int) -> int:
    """Smallest M of 1, 2, 4, 8 at which a w x h box still spans >= ``size`` pixels both ways in an
    M/8-scale decode (8 when none does). Only powers of two: libjpeg-turbo has SIMD IDCTs for those
    and plain C for 3/8..7/8, which measured slower than a full-size decode (ImageNet JPEGs, S=224)."""
    m = 1
    while m < 8 and min(w, h) * m < 8 * size:
        m *= 2
    return m


def _scaled_box(box_px, sx: float, sy: float, aw: int, ah: int) -> tuple[int, int, int, int]:
    """``box_px`` (x0, y0, w, h) in original pixels -> (bx0, by0, bx1, by1) whole pixels of an
    aw x ah decode at scale (sx, sy); WHOLE -> the whole decode (including a reduced decode's last
    pixel, which is partly padding)."""
    if box_px == WHOLE:
        return 0, 0, aw, ah
    x0, y0, w, h = box_px
    bx0 = min(max(int(round(x0 * sx)), 0), aw - 1)
    by0 = min(max(int(round(y0 * sy)), 0), ah - 1)
    bx1 = min(max(int(round((x0 + w) * sx)), bx0 + 1), aw)
    by1 = min(max(int(round((y0 + h) * sy)), by0 + 1), ah)
    return bx0, by0, bx1, by1


def _resize(region: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """region [h, w, 3] -> [size, size, 3], mirrored when ``flip``. A plain cv2 resize (4-6x faster
    than PIL's box resize): bicubic up to 1.5x downscaling, area averaging (anti-aliased) beyond."""
    shrink = min(region.shape[0], region.shape[1]) / size
    out = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA if shrink > 1.5 else cv2.INTER_CUBIC)
    if flip:
        out = cv2.flip(out, 1)
    return np.ascontiguousarray(out)


def _finish(arr: np.ndarray, box_px, size: int, flip: bool):
    """Crop ``box_px`` (pixels) out of the fully decoded ``arr``, resize to size x size, flip.
    Returns (crop [S, S, 3] uint8, applied box (x0, y0, w, h) in pixels)."""
    bx0, by0, bx1, by1 = _scaled_box(box_px, 1.0, 1.0, arr.shape[1], arr.shape[0])
    return _resize(arr[by0:by1, bx0:bx1], size, flip), (bx0, by0, bx1 - bx0, by1 - by0)


def _decode_jpeg(data: bytes, m: int, span, width: int, height: int, fast: bool):
    """Decode the JPEG at scale m/8, at least the pixels ``span`` (bx0, by0, bx1, by1) of that scale.
    Returns (array [h, w, 3] uint8, x, y): the decoded pixels and where array[0, 0] lies in the
    scaled image; (None, 0, 0) when it needs the PIL fallback. The region decoder and simplejpeg's
    full decode give the same pixels (tests/unit/data/test_jpeg_region.py); ``fast``: libjpeg's fast
    integer IDCT instead of the accurate one."""
    if jpeg_region.available():
        return jpeg_region.decode_region(data, m, *span, fast=fast)
    aw, ah = -(-width * m // 8), -(-height * m // 8)
    try:
        # strict: warnings send the file to PIL, which decides if it is usable
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, min_width=aw, min_height=ah, strict=True)
    except ValueError:
        return None, 0, 0
    return (arr, 0, 0) if arr.shape[:2] == (ah, aw) else (None, 0, 0)


def _draw(rng: np.random.Generator, width: int, height: int, scale, hflip: float):
    """(box, flip); ``scale=None`` is the whole image, unflipped (AMT's attention pass)."""
    if scale is None:
        return WHOLE, False
    box = sample_box(rng, width, height, scale)
    flip = bool(rng.random() < hflip)
    return box, flip


def _norm_box(box_px, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) in pixels -> (x0, y0, x1, y1) fractions; clamped because a reduced decode's
    last row/column (libjpeg rounds its size up) maps a little past the original edge."""
    x0, y0, w, h = box_px
    return (x0 / width, y0 / height, min((x0 + w) / width, 1.0), min((y0 + h) / height, 1.0))


@dataclass(frozen=True)
class CropPlan:
    """Where a JPEG's crop comes from, decided from its header size alone (before any decode):
    what ``crop_bytes`` decodes on the CPU, and what the device decoder (device_decode.py) cuts
    out of a full decode, so both report the same box and flip."""

    drawn: tuple  # the drawn box (x0, y0, w, h) in original pixels, or WHOLE
    flip: bool
    m: int  # the CPU decode's IDCT scale M/8
    span: tuple[int, int, int, int]  # (bx0, by0, bx1, by1): the crop in pixels of the M/8-scale image
    box: tuple[float, float, float, float]  # the applied box (x0, y0, x1, y1) / (W, H): the batch's "box"

    def region(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the span in original pixels, clipped to the image (the M/8 decode's
        last pixel is partly padding)."""
        k = 8 // self.m
        bx0, by0, bx1, by1 = self.span
        return bx0 * k, by0 * k, min(bx1 * k, width), min(by1 * k, height)


def plan_crop(rng: np.random.Generator, width: int, height: int, size: int, scale=(0.2, 1.0), hflip: float = 0.5) -> CropPlan:
    """Draw the box and flip of a width x height JPEG (``_draw``) and the decode that serves them:
    the IDCT scale (``decode_scale``) and the box rounded to whole pixels of that scale."""
    box, flip = _draw(rng, width, height, scale, hflip)
    m = decode_scale(box[2] or width, box[3] or height, size)
    # libjpeg's M/8 decode is ceil(W * M / 8) wide: its last pixel is partly padding
    sx = sy = m / 8
    span = _scaled_box(box, sx, sy, -(-width * m // 8), -(-height * m // 8))
    bx0, by0, bx1, by1 = span
    applied = (bx0 / sx, by0 / sy, (bx1 - bx0) / sx, (by1 - by0) / sy)
    return CropPlan(box, flip, m, span, _norm_box(applied, width, height))


def crop_array(arr: np.ndarray, rng: np.random.Generator, size: int, scale=(0.2, 1.0), hflip: float = 0.5) -> Crop:
    """RandomResizedCrop + flip of an in-memory RGB image [H, W, 3] uint8 (synthetic data);
    ``scale=None``: the whole image resized to size x size (aspect not kept), no flip."""
    height, width = arr.shape[:2]
    box, flip = _draw(rng, width, height, scale, hflip)
    out, applied = _finish(arr, box, size, flip)
    return Crop(out, _norm_box(applied, width, height), flip, False)


def crop_bytes(data: bytes, rng: np.random.Generator, size: int, scale=(0.2, 1.0), hflip: float = 0.5,
               fast_idct: bool = True) -> Crop:
    """Decode an encoded image and apply RandomResizedCrop(size, scale, bicubic) + flip.

    JPEGs are decoded at the smallest IDCT scale M/8 (M = 1, 2, 4, 8) whose crop still covers
    ``size`` pixels, and only the rows and columns the crop needs (jpeg_region.py; simplejpeg's
    full decode when that extension is not built). Anything libjpeg cannot read, or reads only with warnings (CMYK, PNG or GIF bytes
    in a .JPEG, odd modes, stray bytes before a marker), goes to PIL and is converted to RGB with
    the same box and flip. Raises UnreadableImage when PIL cannot decode it either (corrupt,
    truncated). ``scale=None``: the whole image resized to size x size, no flip. ``fast_idct``:
    libjpeg's fast integer IDCT (data.jpeg_idct: fast), else the accurate one.
    """
    drawn = None  # (width, height, box, flip) once drawn: a fallback decode reuses it
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace in ("RGB", "YCbCr", "Gray"):
            plan = plan_crop(rng, width, height, size, scale, hflip)
            drawn = (width, height, plan.drawn, plan.flip)
            arr, ax, ay = _decode_jpeg(data, plan.m, plan.span, width, height, fast_idct)
            if arr is not None:
                bx0, by0, bx1, by1 = plan.span
                out = _resize(arr[by0 - ay:by1 - ay, bx0 - ax:bx1 - ax], size, plan.flip)
                return Crop(out, plan.box, plan.flip, False)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None
    width, height = rgb.size
    if drawn is not None and drawn[:2] == (width, height):
        box, flip = drawn[2], drawn[3]
    else:
        box, flip = _draw(rng, width, height, scale, hflip)
    out, applied = _finish(np.asarray(rgb), box, size, flip)
    return Crop(out, _norm_box(applied, width, height), flip, True)

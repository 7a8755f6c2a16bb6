"""RandomResizedCrop computed as a box first, then a decode of only as many pixels as it needs.

The box is drawn before decoding so (a) JPEGs can be decoded at 1/2, 1/4, 1/8 scale inside the
IDCT when the crop allows it (simplejpeg ``min_width``/``min_height``), and (b) the box and flip
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


def _finish(arr: np.ndarray, box_px, sx: float, sy: float, size: int, flip: bool):
    """Crop ``box_px`` (original-image pixels) out of ``arr`` (the image decoded at scale sx, sy),
    resize to size x size, flip. Returns (crop [S, S, 3] uint8, applied box in original pixels).

    The box is rounded to whole pixels of the decoded image, so the resize is a plain cv2 resize
    (4-6x faster than PIL's box resize); the reported box is the rounded one, i.e. exactly what
    was applied. Bicubic up to 1.5x downscaling, area averaging (anti-aliased) beyond that.
    """
    x0, y0, w, h = box_px
    ah, aw = arr.shape[:2]
    if box_px == WHOLE:  # including a reduced decode's last pixel, which is partly padding
        shrink = min(aw, ah) / size
        out = cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA if shrink > 1.5 else cv2.INTER_CUBIC)
        return np.ascontiguousarray(out), (0.0, 0.0, aw / sx, ah / sy)
    bx0 = min(max(int(round(x0 * sx)), 0), aw - 1)
    by0 = min(max(int(round(y0 * sy)), 0), ah - 1)
    bx1 = min(max(int(round((x0 + w) * sx)), bx0 + 1), aw)
    by1 = min(max(int(round((y0 + h) * sy)), by0 + 1), ah)
    region = arr[by0:by1, bx0:bx1]
    shrink = min(bx1 - bx0, by1 - by0) / size
    out = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA if shrink > 1.5 else cv2.INTER_CUBIC)
    if flip:
        out = cv2.flip(out, 1)
    return np.ascontiguousarray(out), (bx0 / sx, by0 / sy, (bx1 - bx0) / sx, (by1 - by0) / sy)


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


def crop_array(arr: np.ndarray, rng: np.random.Generator, size: int, scale=(0.2, 1.0), hflip: float = 0.5) -> Crop:
    """RandomResizedCrop + flip of an in-memory RGB image [H, W, 3] uint8 (synthetic data);
    ``scale=None``: the whole image resized to size x size (aspect not kept), no flip."""
    height, width = arr.shape[:2]
    box, flip = _draw(rng, width, height, scale, hflip)
    out, applied = _finish(arr, box, 1.0, 1.0, size, flip)
    return Crop(out, _norm_box(applied, width, height), flip, False)


def crop_bytes(data: bytes, rng: np.random.Generator, size: int, scale=(0.2, 1.0), hflip: float = 0.5) -> Crop:
    """Decode an encoded image and apply RandomResizedCrop(size, scale, bicubic) + flip.

    JPEGs go through simplejpeg at the smallest IDCT scale whose crop still covers ``size``
    pixels. Anything simplejpeg cannot read, or reads only with warnings (CMYK, PNG or GIF bytes
    in a .JPEG, odd modes, stray bytes before a marker), goes to PIL and is converted to RGB with
    the same box and flip. Raises UnreadableImage when PIL cannot decode it either (corrupt,
    truncated). ``scale=None``: the whole image resized to size x size, no flip.
    """
    drawn = None  # (width, height, box, flip) once drawn: a fallback decode reuses it
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace in ("RGB", "YCbCr", "Gray"):
            box, flip = _draw(rng, width, height, scale, hflip)
            drawn = (width, height, box, flip)
            x0, y0, w, h = box
            try:
                arr = simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB",
                    min_width=math.ceil(width * size / (w or width)),
                    min_height=math.ceil(height * size / (h or height)),
                    strict=True,  # warnings send the file to PIL, which decides if it is usable
                )
            except ValueError:
                arr = None
            if arr is not None:
                # libjpeg scales by M/8 and rounds the output size up, so the size ratio
                # overstates the scale for sides that are not multiples of 8: recover M/8.
                sx, sy = round(8 * arr.shape[1] / width) / 8, round(8 * arr.shape[0] / height) / 8
                out, applied = _finish(arr, box, sx, sy, size, flip)
                return Crop(out, _norm_box(applied, width, height), flip, False)
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
    out, applied = _finish(np.asarray(rgb), box, 1.0, 1.0, size, flip)
    return Crop(out, _norm_box(applied, width, height), flip, True)

"""The evaluation transform, defined here and nowhere else: resize the short side to
R = round(S / crop_pct) with bicubic interpolation, then center-crop S x S. With the default
crop_pct 0.875, S = 224 reads a 256-pixel short side and keeps its central 224 x 224.

This is the eval transform of the published linear-probe and kNN protocols (MAE, DINO, timm's
``crop_pct``): torchvision's ``Resize(R, BICUBIC)`` then ``CenterCrop(S)`` on a PIL image,
reproduced with PIL itself (torchvision is not a dependency), so the pixels are those such a
pipeline gives:
  - resize: the short side becomes R, the long side int(R * long / short) (torchvision truncates);
    PIL's bicubic filter, which widens its support when it shrinks (anti-aliased);
  - crop: left = round((w - S) / 2), top = round((h - S) / 2) (torchvision's CenterCrop).
Images are decoded at full size (never a reduced IDCT: its pixels differ): plain RGB / YCbCr /
gray JPEGs by simplejpeg (libjpeg-turbo, the same pixels as PIL's decode and about twice as fast;
the tests compare them), anything else by PIL, converted to RGB (CMYK, palette, PNG, ...).

Used by every evaluation pass (probe and kNN features, CKA images, the in-training CKA check):
the folder and synthetic full pass (``full_pass.WholeImages`` with a ``crop_pct``), the WebDataset
eval stream (``wds_loader.ShardStream``) and FFCV .beton files (``sources.FfcvFile.read``: the
stored bytes are decoded here, not by FFCV's Loader, whose resize is OpenCV's INTER_AREA on a box and
would not give these pixels). Training crops (``crop.py``) and AMT's whole-image pass are separate.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from mimscale.data.crop import Crop, UnreadableImage

CROP_PCT = 0.875  # timm / torchvision / MAE / DINO: 224 -> 256 -> 224


def check_crop_pct(crop_pct) -> float:
    """``crop_pct`` as a float in (0, 1]; ValueError naming it otherwise."""
    try:
        value = float(crop_pct)
    except (TypeError, ValueError):
        raise ValueError(f"crop_pct {crop_pct!r}: expected a number in (0, 1], e.g. 0.875") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"crop_pct {crop_pct!r}: must be in (0, 1] (the crop's share of the resized short side), e.g. 0.875")
    return value


def resize_size(size: int, crop_pct: float = CROP_PCT) -> int:
    """The short side R the image is resized to before the S x S center crop: round(S / crop_pct)."""
    return max(int(size), int(round(size / check_crop_pct(crop_pct))))


def resized_shape(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``short`` (torchvision's rule: the long
    side is truncated, not rounded)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the size x size center crop of a width x height image (torchvision's rule)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def transform_image(img: Image.Image, size: int, crop_pct: float = CROP_PCT) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An RGB PIL image -> (pixels [S, S, 3] uint8, box (x0, y0, x1, y1) of the crop as fractions
    of the image's width and height)."""
    width, height = img.size
    nw, nh = resized_shape(width, height, resize_size(size, crop_pct))
    resized = img.resize((nw, nh), Image.BICUBIC)
    left, top = center_offset(nw, nh, size)
    out = np.array(resized.crop((left, top, left + size, top + size)))  # a writable copy: torch wraps it
    return out, (left / nw, top / nh, (left + size) / nw, (top + size) / nh)


def center_crop(data, size: int, crop_pct: float = CROP_PCT) -> Crop:
    """``data``: encoded image bytes, or decoded pixels [H, W, 3] uint8 RGB -> Crop (image
    [S, S, 3] uint8, box, flip False, converted: the bytes were not a plain RGB/gray JPEG).
    Raises UnreadableImage when PIL cannot decode the bytes."""
    if isinstance(data, np.ndarray):
        if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
            raise ValueError(f"pixels {data.shape} {data.dtype}: expected [H, W, 3] uint8 RGB")
        image, box = transform_image(Image.fromarray(data), size, crop_pct)
        return Crop(image, box, False, False)
    if data[:2] == b"\xff\xd8":
        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
            if colorspace in ("RGB", "YCbCr", "Gray"):  # strict: warnings send the file to PIL, which decides
                pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
                image, box = transform_image(Image.fromarray(pixels), size, crop_pct)
                return Crop(image, box, False, False)
        except ValueError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            converted = not (img.format == "JPEG" and img.mode in ("RGB", "L"))
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None
    image, box = transform_image(rgb, size, crop_pct)
    return Crop(image, box, False, converted)

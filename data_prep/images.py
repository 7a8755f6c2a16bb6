"""Image preparation shared by the WebDataset and FFCV writers.

One decision per file, made the same way for both writers:

- **keep**: a JPEG (starts with FF D8) in RGB or YCbCr that simplejpeg decodes with
  ``strict=True`` (no libjpeg warnings). This is the trainer's fast path (mimscale.data.crop), so
  the WebDataset writer stores the original bytes untouched unless ``max_side`` asks for a resize.
- **convert** to an RGB JPEG: grayscale JPEGs, CMYK/YCCK JPEGs, PNG/GIF/BMP/... bytes (whatever
  the file name says), other modes (P, LA, RGBA, I;16 -> RGB by PIL's ``convert("RGB")``, as the
  trainer's fallback does), and JPEGs that libjpeg decodes only with warnings but PIL decodes fully.
  The reason is a short string recorded in the manifests.
- **skip**: empty, truncated, corrupt or unknown data; ``Unusable`` carries the reason.

``max_side`` (None = keep the size) downsizes so the longest side equals ``max_side``
(cv2 INTER_AREA, the same filter FFCV's own ``max_resolution`` uses); callers record the
original size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8"


class Unusable(Exception):
    """The file cannot be used (empty, truncated, corrupt, unknown format); str(e) is the reason."""


@dataclass
class Decoded:
    array: np.ndarray  # [h, w, 3] uint8 RGB; smaller than (width, height) when decoded scaled
    width: int  # original size
    height: int
    converted: Optional[str]  # why the file is not usable as-is, or None


@dataclass
class PreparedJpeg:
    data: bytes  # JPEG bytes: the original ones when converted is None and no resize was needed
    width: int  # original size (before any --max-side resize)
    height: int
    converted: Optional[str]
    resized: bool


def target_size(width: int, height: int, max_side: Optional[int]) -> tuple[int, int]:
    """(w, h) with the longest side equal to max_side when it is longer, else (width, height)."""
    longest = max(width, height)
    if max_side is None or longest <= max_side:
        return width, height
    scale = max_side / longest
    # The longest side is set exactly; rounding could otherwise give max_side - 1.
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def _pil_decode(data: bytes, why: Optional[str]) -> Decoded:
    """Full decode through PIL, refusing truncated data (LOAD_TRUNCATED_IMAGES off while loading)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a global flag: another library may have turned it on
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode = img.format, img.mode
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        # Its message names the BytesIO's address: reasons must not vary between runs.
        raise Unusable("not an image PIL knows") from None
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise Unusable(f"{type(e).__name__}: {e}"[:200]) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if fmt != "JPEG":
        reason = f"{fmt} data, mode {mode}"
    elif mode == "L":
        reason = "grayscale JPEG"
    elif mode == "CMYK":
        reason = why or "CMYK JPEG"
    elif mode != "RGB":
        reason = f"JPEG mode {mode}"
    else:
        reason = why or "JPEG that libjpeg reads only with warnings"
    arr = np.asarray(rgb)
    return Decoded(arr, arr.shape[1], arr.shape[0], reason)


def decode(data: bytes, max_side: Optional[int] = None) -> Decoded:
    """Decode to RGB and classify; raises Unusable. With ``max_side``, a plain JPEG may decode at
    a reduced libjpeg IDCT scale (M/8) that still covers the target size, so the resize that
    follows has less to do; the entropy decoding, where truncation and corruption show, runs in
    full either way."""
    if not data:
        raise Unusable("empty file")
    why = None
    if data[:2] == JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            colorspace, why = None, f"libjpeg: {e}"[:200]
        if colorspace in ("RGB", "YCbCr", "Gray"):
            mw, mh = target_size(width, height, max_side)
            try:
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_width=mw, min_height=mh)
            except ValueError as e:
                arr, why = None, f"libjpeg: {e}"[:200]
            if arr is not None:
                return Decoded(arr, width, height, "grayscale JPEG" if colorspace == "Gray" else None)
        elif colorspace is not None:
            why = f"{colorspace} JPEG"
    return _pil_decode(data, why)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


def prepare_array(data: bytes, max_side: Optional[int] = None) -> Decoded:
    """RGB uint8 array [H, W, 3] resized per ``max_side`` (the FFCV writer's input); width and
    height stay the original size. Raises Unusable."""
    dec = decode(data, max_side)
    size = target_size(dec.width, dec.height, max_side)
    return Decoded(np.ascontiguousarray(_resize(dec.array, size)), dec.width, dec.height, dec.converted)


def prepare_jpeg(data: bytes, max_side: Optional[int] = None, quality: int = 95, reencode: bool = False) -> PreparedJpeg:
    """JPEG bytes for a WebDataset shard: the original bytes when usable as-is, else an RGB JPEG
    at ``quality`` (4:4:4, simplejpeg's default). ``reencode``: every image re-encoded at
    ``quality`` with 4:2:0 chroma, as FFCV's writer does (OpenCV's default): ImageNet-like photos
    then decode ~35% faster than 4:4:4 originals, the entropy decoding being most of a decode's
    cost. Raises Unusable."""
    dec = prepare_array(data, max_side)
    resized = (dec.array.shape[1], dec.array.shape[0]) != (dec.width, dec.height)
    if reencode:
        out = simplejpeg.encode_jpeg(dec.array, quality=quality, colorspace="RGB", colorsubsampling="420")
        return PreparedJpeg(out, dec.width, dec.height, dec.converted, resized)
    if dec.converted is None and not resized:
        return PreparedJpeg(data, dec.width, dec.height, None, False)
    out = simplejpeg.encode_jpeg(dec.array, quality=quality, colorspace="RGB")
    return PreparedJpeg(out, dec.width, dec.height, dec.converted, resized)


def check_jpeg(data: bytes) -> Optional[str]:
    """None when ``data`` is a JPEG the trainer decodes (simplejpeg strict, else PIL fully loading
    it), else the reason it does not (verify's check)."""
    if data[:2] != JPEG_MAGIC:
        return "not JPEG data"
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        return None
    except ValueError:
        pass
    try:
        _pil_decode(data, None)
    except Unusable as e:
        return f"undecodable JPEG: {e}"
    return None


"""Partial JPEG decoding: only the rows and columns a crop needs (mimscale/data/_jpeg_region.c).

The pixels equal those of a full decode at the same scale (tests/unit/data/test_jpeg_region.py), so
crops do not depend on whether the extension is built; it only makes them cheaper (ImageNet
JPEGs, RandomResizedCrop scale (0.2, 1): ~20% less decode time, python -m mimscale.bench decode).
One difference on damaged files: the rows below a crop are never read, so corrupt entropy data
there goes unnoticed; a truncated file (no end-of-image marker) is refused in strict mode like a
full decode refuses it.

``FUNCTION`` is the C entry point as a ctypes function (None when the extension is not built: a
machine without libjpeg headers at install time); crop.py calls it through ``decode_region``,
FFCV's numba decoder (ffcv_decode.py) calls it directly (numba compiles ctypes calls).
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from typing import Optional

import numpy as np

# Return codes of mimscale_decode_region (see the C file).
OK, ERROR, WARNING, COLORSPACE, BOX, CAPACITY = 0, -1, -2, -3, -4, -5
INFO = 6  # rx0, ry0, rw, rh, scaled width, scaled height
# libjpeg-turbo's fancy upsampling treats a cropped region's first and last column as image edges:
# decoding one column more on each side keeps the wanted columns equal to a full decode's.
MARGIN = 1


def _load() -> Optional[ctypes._CFuncPtr]:
    spec = importlib.util.find_spec("mimscale.data._jpeg_region")
    if spec is None or spec.origin is None:
        return None
    try:  # a build that no longer loads (libjpeg removed or replaced since): fall back, do not fail
        fn = ctypes.CDLL(spec.origin).mimscale_decode_region
    except (OSError, AttributeError) as e:
        print(f"[mimscale.data] {spec.origin} does not load ({e}): crops use full decodes; make setup rebuilds it",
              file=sys.stderr)
        return None
    fn.restype = ctypes.c_int
    # data, size, m, x0, y0, x1, y1, out, out_cap, fast, strict, info
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return fn


FUNCTION = _load()
_warned = False


def available() -> bool:
    """Whether the extension is built; the first ``False`` answer also says so on stderr."""
    global _warned
    if FUNCTION is None and not _warned:
        _warned = True
        print("[mimscale.data] mimscale/data/_jpeg_region is not built (no libjpeg headers at install time?): "
              "crops use full decodes, same pixels, slower; apt-get install libjpeg-dev, then reinstall mimscale "
              "(pip install, or make setup in a checkout)",
              file=sys.stderr)
    return FUNCTION is not None


def decode_region(data: bytes, m: int, x0: int, y0: int, x1: int, y1: int, fast: bool = False,
                  strict: bool = True) -> tuple[Optional[np.ndarray], int, int]:
    """Decode the JPEG ``data`` at scale m/8 (m in 1, 2, 4, 8), at least the box [x0, x1) x [y0, y1)
    given in pixels of that scale. Returns (region [rh, rw, 3] uint8 RGB, rx0, ry0): the region's
    top-left corner in the scaled image; it covers the box (clipped to the image) and may extend
    past it sideways. (None, 0, 0) when libjpeg cannot decode the file, decodes it only with
    warnings (``strict``), or it is not YCbCr/RGB/gray: the caller falls back to another decoder.
    Needs ``available()``.
    """
    info = np.zeros(INFO, np.int32)
    # rows [y0, y1) of at most the full scaled width (+ one iMCU of rounding): an upper bound that
    # needs no header read first; np.empty costs nothing for the unused tail
    width_bound = (x1 - x0) + 2 * MARGIN + 64
    buf = np.empty(max(1, y1 - y0) * width_bound * 3, np.uint8)
    rc = FUNCTION(data, len(data), m, x0 - MARGIN, y0, x1 + MARGIN, y1, buf.ctypes.data, buf.size, int(fast), int(strict),
                  info.ctypes.data)
    if rc == CAPACITY:  # a region wider than the bound (very wide iMCUs): retry with the whole width
        buf = np.empty(max(1, y1 - y0) * (info[4] or 65536) * 3, np.uint8)
        rc = FUNCTION(data, len(data), m, x0 - MARGIN, y0, x1 + MARGIN, y1, buf.ctypes.data, buf.size, int(fast),
                      int(strict), info.ctypes.data)
    if rc != OK:
        return None, 0, 0
    rx0, ry0, rw, rh = (int(v) for v in info[:4])
    return buf[: rh * rw * 3].reshape(rh, rw, 3), rx0, ry0

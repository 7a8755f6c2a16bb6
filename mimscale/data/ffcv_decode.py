"""FFCV decoder op: RandomResizedCrop(S) + horizontal flip, seeded by (seed, epoch, global index),
that reports the box and flip it applied.

Why not FFCV's RandomResizedCropRGBImageDecoder: its box comes from numba's np.random (per-thread
state the Loader cannot seed: crops change with the thread count and on resume), it hides the box,
and it always decodes the whole JPEG at full size.

Per sample (one prange iteration, which writes only its own output rows):
  1. draw the box (x0, y0, w, h) in stored-image pixels with torchvision's rule (as crop.sample_box)
     and the flip, from a counter-based hash (splitmix64) of (seed, epoch, global index);
  2. decode the JPEG at the smallest IDCT scale M/8 (M = 1, 2, 4, 8) at which the box still spans
     >= S pixels both ways (libjpeg-turbo scales inside the IDCT). Only powers of two: its 3/8..7/8
     IDCTs are plain C and measured slower than a full-size decode (ImageNet JPEGs, S=224). Only
     the box's rows and columns are decoded (jpeg_region.py; FFCV's whole-image imdecode when that
     extension is not built), with FFCV's fast integer IDCT unless data.jpeg_idct says accurate;
  3. round the box to whole pixels of that decode, crop and resize it to S x S with the other
     sources' rule (crop.py: OpenCV bicubic up to 1.5x shrink, area beyond; _cv_resize.cpp), or
     with FFCV's resize_crop (area averaging at every scale) when that extension is not built;
  4. mirror the S x S result in place when flipped (FFCV's imdecode can flip, but through
     libjpeg's lossless transform, which leaves the partial last block column unflipped).

Outputs (a tuple, per batch of n):
  images [n, S, S, 3] uint8
  params [n, 9] int64 = (ax0, ay0, ax1, ay1, M, W, H, flip, status): the applied box is
         [ax0, ax1) x [ay0, ay1) in pixels of the M/8-scale decode = (ax * 8 / M) stored pixels;
         W, H the stored size; status the JPEG decoder's return code (0: ok).
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mimscale.data import jpeg_region

RATIO = (3.0 / 4.0, 4.0 / 3.0)
PARAMS = 9

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@intrinsic
def _load_i64(typingctx, address, offset):
    """int64 at ``address + 8 * offset``, read at run time. Numba freezes arrays a jitted function
    closes over into constants; the epoch (changes per pass) and the index table (large) must not be."""
    if not isinstance(address, types.Integer) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        base = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64), i64.as_pointer())
        return builder.load(builder.gep(base, [context.cast(builder, args[1], signature.args[1], types.int64)]))

    return types.int64(address, offset), codegen


# Box drawing is compiled without fastmath (FFCV compiles its ops with it): a crop must not depend
# on how LLVM chose to vectorize the caller.
@njit(cache=False)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@njit(cache=False)
def sample_key(seed, epoch, index):
    """uint64 key of one sample's randomness; seed, epoch, index: non-negative ints."""
    k = _mix(np.uint64(seed) ^ _GOLDEN)
    k = _mix(k + (np.uint64(epoch) + np.uint64(1)) * _GOLDEN)
    return _mix(k + (np.uint64(index) + np.uint64(1)) * _GOLDEN)


@njit(cache=False)
def uniform(key, counter):
    """The ``counter``-th U[0, 1) draw of ``key`` (53 random bits)."""
    z = _mix(key + (np.uint64(counter) + np.uint64(1)) * _GOLDEN)
    return float(z >> np.uint64(11)) * _TO_UNIT


@njit(cache=False)
def draw_crop(key, width, height, smin, smax, hflip):
    """(x0, y0, w, h, flip) in pixels: area fraction ~ U(smin, smax), log aspect ~ U(log 3/4, log 4/3),
    10 tries, then the whole image center-cropped to the ratio range (torchvision's rule).
    smin < 0: the whole image, unflipped (AMT's attention pass over uncropped images)."""
    if smin < 0:
        return 0, 0, width, height, False
    area = float(width) * float(height)
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    flip = uniform(key, 99) < hflip
    for t in range(10):
        target = area * (smin + (smax - smin) * uniform(key, 4 * t))
        aspect = math.exp(lo + (hi - lo) * uniform(key, 4 * t + 1))
        w = int(np.rint(math.sqrt(target * aspect)))
        h = int(np.rint(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(uniform(key, 4 * t + 2) * (width - w + 1))
            y0 = int(uniform(key, 4 * t + 3) * (height - h + 1))
            return x0, y0, w, h, flip
    in_ratio = float(width) / float(height)
    w, h = width, height
    if in_ratio < RATIO[0]:
        h = int(np.rint(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w = int(np.rint(height * RATIO[1]))
    return (width - w) // 2, (height - h) // 2, w, h, flip


@njit(cache=False)
def decode_scale(w, h, size):
    """Smallest M of 1, 2, 4, 8 with min(w, h) * M / 8 >= size (8 when none is)."""
    m = 1
    while m < 8 and min(w, h) * m < 8 * size:
        m *= 2
    return m


@njit(cache=False)
def scaled_span(a, b, m, full):
    """[a, b) stored pixels -> nearest [sa, sb) pixels of the M/8 decode, kept inside the pixels
    that are wholly image (the last one of a side that is not a multiple of 8/M is part padding)."""
    inside = (full * m) // 8
    sb = min((b * m + 4) // 8, inside)
    sa = min((a * m + 4) // 8, sb - 1)
    return max(sa, 0), sb


@njit(cache=False)
def mirror(img):
    """Flip [H, W, C] left-right in place."""
    n = img.shape[1]
    for r in range(img.shape[0]):
        for c in range(n // 2):
            for k in range(img.shape[2]):
                t = img[r, c, k]
                img[r, c, k] = img[r, n - 1 - c, k]
                img[r, n - 1 - c, k] = t


_imdecode = njit(cache=False)(imdecode)
_resize_crop = njit(cache=False)(resize_crop)
_region = jpeg_region.FUNCTION


def _load_cv_resize():
    """mimscale/data/_cv_resize.cpp's entry point as a ctypes function, or None when not built."""
    spec = importlib.util.find_spec("mimscale.data._cv_resize")
    if spec is None or spec.origin is None:
        return None
    try:  # a build that no longer loads (OpenCV replaced since): FFCV's own resize instead
        fn = ctypes.CDLL(spec.origin).mimscale_resize_crop
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]  # src, h, w, stride, dst, S
    return fn


_cv_resize = _load_cv_resize()


@njit(cache=False)
def _resize_cv(src, y0, y1, x0, x1, out):
    """Rows [y0, y1) x columns [x0, x1) of ``src`` [H, W, 3] (whole rows in memory) -> ``out``
    [S, S, 3]: bicubic up to 1.5x shrink, area beyond (crop.py's rule). Returns 0 or -1."""
    width = src.shape[1]
    return _cv_resize(src.ctypes.data + (y0 * width + x0) * 3, y1 - y0, x1 - x0, width * 3, out.ctypes.data, out.shape[0])


@njit(cache=False)
def _resize_area(src, y0, y1, x0, x1, out):
    """As _resize_cv through FFCV's resize_crop (area averaging at every scale): the path when
    mimscale/data/_cv_resize is not built."""
    _resize_crop(src, y0, y1, x0, x1, out)
    return 0


# chosen once, as _decode_scaled below
_resize_region = _resize_cv if _cv_resize is not None else _resize_area


@njit(cache=False)
def _decode_region(data, height, width, m, ax0, ay0, ax1, ay1, fast):
    """The rows [ay0, ay1) and (at least) the columns [ax0, ax1) of the M/8-scale decode, as
    (region [rh, rw, 3], its first column in the scaled image, status); only these pixels are
    decoded (jpeg_region.py), one column more each side keeps the wanted ones exact."""
    rows = ay1 - ay0
    buf = np.empty(rows * (ax1 - ax0 + 2 * jpeg_region.MARGIN + 64) * 3, np.uint8)
    info = np.zeros(jpeg_region.INFO, np.int32)
    status = _region(data.ctypes.data, data.size, m, ax0 - jpeg_region.MARGIN, ay0, ax1 + jpeg_region.MARGIN, ay1,
                     buf.ctypes.data, buf.size, fast, 1, info.ctypes.data)  # strict: as FFCV's imdecode fails on warnings
    if status != 0:
        return buf[:3].reshape(1, 1, 3), ax0, status
    return buf[: rows * info[2] * 3].reshape(rows, info[2], 3), info[0], 0


@njit(cache=False)
def _decode_full(data, height, width, m, ax0, ay0, ax1, ay1, fast):
    """As _decode_region, through FFCV's imdecode (a whole M/8-scale decode, always the fast IDCT):
    the path when mimscale/data/_jpeg_region is not built. Rows start at 0: the caller offsets."""
    decoded = np.empty(((height * m + 7) // 8, (width * m + 7) // 8, 3), np.uint8)
    status = _imdecode(data, decoded, np.uint32(height), np.uint32(width), np.uint32(height), np.uint32(width),
                       np.uint32(0), np.uint32(0), np.uint32(m), np.uint32(8), False, False)
    return decoded[ay0:ay1], 0, status


# chosen once: numba resolves the callee when it compiles crop_one
_decode_scaled = _decode_region if _region is not None else _decode_full


@njit(cache=False)
def crop_one(data, is_jpeg, height, width, key, size, smin, smax, hflip, fast, out, params):
    """Steps 1-4 for one sample: ``data`` its stored bytes, ``out`` [S, S, 3] and ``params`` [9]
    its own output rows; ``fast``: 1 for libjpeg's fast integer IDCT (FFCV's own), 0 for the
    accurate one. Compiled once per process; each Loader compiles only its prange loop."""
    x0, y0, w, h, flip = draw_crop(key, width, height, smin, smax, hflip)
    status = 0
    if is_jpeg:
        m = decode_scale(w, h, size)
        ax0, ax1 = scaled_span(x0, x0 + w, m, width)
        ay0, ay1 = scaled_span(y0, y0 + h, m, height)
        region, rx0, status = _decode_scaled(data, height, width, m, ax0, ay0, ax1, ay1, fast)
        if status == 0:
            status = _resize_region(region, 0, ay1 - ay0, ax0 - rx0, ax1 - rx0, out)
    else:
        m = 8
        ax0, ax1 = scaled_span(x0, x0 + w, m, width)
        ay0, ay1 = scaled_span(y0, y0 + h, m, height)
        status = _resize_region(data.reshape(height, width, 3), ay0, ay1, ax0, ax1, out)
    if flip:
        mirror(out)
    params[0], params[1], params[2], params[3], params[4] = ax0, ay0, ax1, ay1, m
    params[5], params[6], params[7], params[8] = width, height, flip, status


class SeededRandomResizedCrop(SimpleRGBImageDecoder):
    """Decoder for RGBImageField; see the module docstring. ``index_table``: int64 [num_samples],
    the global index of each .beton position (None: the position itself). Call ``set_epoch``
    before each pass; the compiled code reads the epoch at run time."""

    def __init__(self, size: int, seed: int, scale=(0.2, 1.0), hflip: float = 0.5, index_table=None,
                 fast_idct: bool = True):
        super().__init__()
        self.fast = int(bool(fast_idct))
        self.size = int(size)
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        # scale None: the whole image, unflipped (encoded as smin < 0 for the compiled code)
        self.scale = (-1.0, -1.0) if scale is None else (float(scale[0]), float(scale[1]))
        self.hflip = 0.0 if scale is None else float(hflip)
        self._epoch = np.zeros(1, np.int64)  # read through its address: keep it alive and never replace it
        self._index = None if index_table is None else np.ascontiguousarray(index_table, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def declare_state_and_memory(self, previous_state):
        shape = (self.size, self.size, 3)
        state = replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1"))
        return state, (AllocationQuery(shape, np.dtype("<u1")), AllocationQuery((PARAMS,), np.dtype("<i8")))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]
        size, seed = self.size, self.seed
        smin, smax, hflip, fast = self.scale[0], self.scale[1], self.hflip, self.fast
        epoch_at = self._epoch.ctypes.data
        has_table = self._index is not None
        table_at = self._index.ctypes.data if has_table else 0

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, params = my_storage
            epoch = _load_i64(epoch_at, 0)
            for i in my_range(len(batch_indices)):
                src = batch_indices[i]
                field = metadata[src]
                gidx = _load_i64(table_at, src) if has_table else np.int64(src)
                crop_one(mem_read(field["data_ptr"], storage_state), field["mode"] == jpg, np.int64(field["height"]),
                         np.int64(field["width"]), sample_key(seed, epoch, gidx), size, smin, smax, hflip, fast,
                         destination[i], params[i])
            n = len(batch_indices)
            return destination[:n], params[:n]

        decode.is_parallel = True
        return decode

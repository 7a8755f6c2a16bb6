"""Where a loader's time goes, per image: ``python -m mimscale.bench decode --path <folder of JPEGs>``.

Every image goes through every stage in turn (so a noisy machine slows all stages alike), on one
core, and each stage's time is averaged over the images (``ms_per_image``: mean; ``median``):

  read                   the file's bytes
  pil_decode, pil_random_resized_crop, pil_to_tensor_normalize
                         the PIL reference's stages (bench loader --source pil: the public MAE recipe)
  full_decode_accurate, full_decode_fast
                         simplejpeg, the whole image at full size (libjpeg's accurate / fast IDCT)
  entropy_only           the crop decoder asked for the last row only: every row before it is
                         entropy-decoded and skipped (what no decoder can avoid for rows above a crop)
  region_decode          the crop decoder over a RandomResizedCrop box (crop.py's scale and box rule)
  resize                 crop.py's resize of that region (bicubic up to 1.5x shrink, area beyond)
  crop_bytes             the whole mimscale crop (data.jpeg_idct fast)
  reencoded_full_decode_fast
                         the same image re-encoded at quality 90, 4:2:0 (data_prep.wds --reencode,
                         FFCV's writer); the encode itself is not timed

Also: ``entropy_share`` (entropy_only / full_decode_fast), ``region_over_full`` (region_decode /
full_decode_fast), the resize's calls by filter, the JPEGs' chroma subsampling and mean size.
"""
from __future__ import annotations

import io
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from mimscale.bench.loader import pil_transforms
from mimscale.data import crop as crop_mod
from mimscale.data import jpeg_region

STAGES = ("read", "pil_decode", "pil_random_resized_crop", "pil_to_tensor_normalize", "full_decode_accurate",
          "full_decode_fast", "entropy_only", "region_decode", "resize", "crop_bytes", "reencoded_full_decode_fast")


def bench_decode(args) -> dict:
    files = sorted(p for p in Path(args.path).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))[: args.images]
    if not files:
        raise SystemExit(f"mimscale.bench decode: no .JPEG/.jpg files under {args.path}")
    if not jpeg_region.available():
        raise SystemExit("mimscale.bench decode: the crop decoder extension is not built (make setup)")
    rrc, post = pil_transforms(args.size)
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    filters, subsampling, sizes = Counter(), Counter(), []

    def timed(stage, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[stage].append(time.perf_counter() - t)
        return out

    def pil_decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    for i, path in enumerate(files):
        data = timed("read", path.read_bytes)
        try:
            height, width, colorspace, sub = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            continue
        if colorspace not in ("YCbCr", "RGB", "Gray"):
            continue  # CMYK & co. go to PIL in the loaders: not what this profiles
        cropped = timed("pil_random_resized_crop", rrc, timed("pil_decode", pil_decode, data))
        timed("pil_to_tensor_normalize", post, cropped)
        full = timed("full_decode_accurate", simplejpeg.decode_jpeg, data, colorspace="RGB")
        timed("full_decode_fast", simplejpeg.decode_jpeg, data, colorspace="RGB", fastdct=True)
        timed("entropy_only", jpeg_region.decode_region, data, 8, 0, height - 1, 16, height, fast=True)
        (x0, y0, w, h), flip = crop_mod._draw(np.random.default_rng(i), width, height, (0.2, 1.0), 0.5)
        m = crop_mod.decode_scale(w, h, args.size)
        span = crop_mod._scaled_box((x0, y0, w, h), m / 8, m / 8, -(-width * m // 8), -(-height * m // 8))
        region, rx, ry = timed("region_decode", jpeg_region.decode_region, data, m, *span, fast=True)
        bx0, by0, bx1, by1 = span
        part = region[by0 - ry:by1 - ry, bx0 - rx:bx1 - rx]
        timed("resize", crop_mod._resize, part, args.size, flip)
        filters["area" if min(part.shape[:2]) / args.size > 1.5 else "bicubic"] += 1
        timed("crop_bytes", crop_mod.crop_bytes, data, np.random.default_rng(i), args.size)
        again = simplejpeg.encode_jpeg(full, quality=90, colorspace="RGB", colorsubsampling="420")
        timed("reencoded_full_decode_fast", simplejpeg.decode_jpeg, again, colorspace="RGB", fastdct=True)
        subsampling[sub] += 1
        sizes.append(len(data))
    mean = {s: 1e3 * statistics.mean(v) for s, v in times.items()}
    return {
        "bench": "decode", "path": args.path, "images": len(sizes), "size": args.size,
        "ms_per_image": mean, "median_ms": {s: 1e3 * statistics.median(v) for s, v in times.items()},
        "entropy_share": mean["entropy_only"] / mean["full_decode_fast"],
        "region_over_full": mean["region_decode"] / mean["full_decode_fast"],
        "resize_filters": dict(filters), "subsampling": dict(subsampling), "mean_kib": statistics.mean(sizes) / 1024,
    }


def add_decode_parser(sub) -> None:
    s = sub.add_parser("decode", help="per-image cost of each loader stage (decode, crop, resize; PIL's)")
    s.add_argument("--path", required=True, help="a folder of JPEGs (searched recursively), e.g. an ImageNet train/")
    s.add_argument("--images", type=int, default=1000, help="at most this many files, in sorted order")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--json", action="store_true", help="print only the JSON result")

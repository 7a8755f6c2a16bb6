"""ImageNet folder -> one FFCV .beton file.

    python -m data_prep.ffcv --src <ImageNet root> --split train|val --out <file>.beton
        [--max-side N] [--jpeg-quality 90] [--write-mode jpg|proportion|raw]
        [--compress-probability 0.5] [--workers N]

``--src`` is listed as the trainer lists ``data.path`` (mimscale.data.imagenet.list_folder):
``<src>/<split>`` when that folder exists, else ``<src>`` itself, including a plain folder of
unlabelled images at any depth (every label -1; the sidecar's classes empty, "unlabelled" the reason).

The .beton has three fields, in this order: ``image`` = RGBImageField(write_mode=jpg|proportion|raw,
max_resolution=max_side, jpeg_quality=Q, compress_probability=P), ``label`` = IntField (class index, -1 unlabelled), ``index`` =
IntField (global sample index, see mimscale.data.imagenet). Samples are in global-index order, bad
files left out. Images are prepared by data_prep.images (RGB, downsized so the longest side is
max_side), so FFCV's own resize finds nothing left to do; FFCV JPEG-encodes them (write mode jpg,
the default: the smallest file), stores raw pixels (raw), or JPEG-encodes each with probability P
and stores the rest raw (proportion: FFCV's published ImageNet recipe is --max-side 500
--write-mode proportion --compress-probability 0.5 --jpeg-quality 90; 3.6x the bytes of jpg on the sample,
and a raw image costs no decode: the fastest loader, see docs/benchmarks.md, "Loader throughput").

Bad files are found first by a parallel prepass that decodes every file with the same code
(FFCV's writer needs the sample count up front and cannot skip a sample). The writer then decodes
the good files again: twice the decoding, but memory stays flat at ImageNet scale.

``<out>.tmp`` is renamed to ``<out>`` when complete; then the sidecar ``<out>.json`` (e.g.
``train.beton.json``) is written the same way: {"format": "mimscale-ffcv/1", "split",
"num_samples", "num_files", "max_side", "jpeg_quality", "write_mode", "compress_probability",
"sha256", "bytes", "classes", "skipped", "converted"} (lists of {"index", "file", "reason"}). FFCV's writer places pages in the order its
processes finish them, so two runs give equal samples but not byte-identical files.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from tqdm import tqdm

from data_prep.images import Unusable, decode, prepare_array, target_size
from data_prep.manifest import default_workers, dump_json, sha256_file, write_atomic, writer_parser
from mimscale.data.imagenet import LayoutError, Listing, list_folder

FORMAT = "mimscale-ffcv/1"
MIN_PAGE = 8 << 20  # FFCV's default page size; a page must hold a sample's whole JPEG
WRITE_MODES = ("jpg", "proportion", "raw")  # FFCV's RGBImageField modes mimscale's decoder reads


class SourceChanged(RuntimeError):
    """A file that passed the prepass failed while writing (changed on disk during the run)."""


class _Prepared:
    """The indexable dataset DatasetWriter reads: ``ds[i] -> (rgb array, label, i)``.

    It never raises: an exception inside FFCV's writer processes leaves the parent waiting
    forever, so a failure (a file changed since the prepass) returns a placeholder image and
    sets a shared flag that the parent checks before it keeps the file."""

    def __init__(self, listing: Listing, max_side: Optional[int], failed):
        self.listing = listing
        self.max_side = max_side
        self.failed = failed

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        try:
            arr = prepare_array(self.listing.read(i), self.max_side).array
        except Exception:
            self.failed.value = 1
            arr = np.zeros((8, 8, 3), np.uint8)
        return arr, int(self.listing.labels[i]), int(i)


_STATE: dict = {}  # listing and max_side in each prepass process (inherited once, not sent per task)


def _init_prepass(listing: Listing, max_side: Optional[int], pool: bool = True) -> None:
    if pool:
        cv2.setNumThreads(1)  # one process per core already
    _STATE.update(listing=listing, max_side=max_side)


def _inspect(i: int):
    """(index, original (w, h) or None, converted reason, skip reason) of one file. Decoding at
    the reduced scale the writer will use checks the same entropy-coded data, for less work."""
    listing = _STATE["listing"]
    try:
        dec = decode(listing.read(i), _STATE["max_side"])
    except Unusable as e:
        return i, None, None, str(e)
    except Exception as e:  # unreadable file: one sample never stops the job
        return i, None, None, f"{type(e).__name__}: {e}"[:200]
    return i, (dec.width, dec.height), dec.converted, None


def _page_size(sizes: list[tuple[int, int]], max_side: Optional[int]) -> int:
    """A power of two that holds the largest image's JPEG (FFCV cannot split one over pages, and
    its writer processes die on a bigger one). Bound: the raw pixels plus 1 MiB for headers;
    OpenCV's 4:2:0 JPEG of pure noise at quality 100 measured 0.66x raw, photos far less."""
    raw = max((w * h * 3 for w, h in (target_size(w, h, max_side) for w, h in sizes)), default=0)
    need = raw + (1 << 20)
    page = MIN_PAGE
    while page < need:
        page *= 2
    return page


def write_beton(
    src: str | Path,
    split: str,
    out: str | Path,
    max_side: Optional[int] = None,
    jpeg_quality: int = 90,
    workers: Optional[int] = None,
    progress: bool = True,
    write_mode: str = "jpg",
    compress_probability: float = 0.5,
) -> dict:
    """Write ``<src>/<split>`` to the .beton ``out`` and its sidecar ``<out>.json``; returns the sidecar."""
    from ffcv.fields import IntField, RGBImageField  # imported here: numba start-up is slow
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode {write_mode!r}: allowed values: {', '.join(WRITE_MODES)}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability {compress_probability}: must be in [0, 1]")
    listing = list_folder(src, split)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else max(1, workers)
    n = len(listing)

    results = []
    with tqdm(total=n, unit="img", disable=not progress, desc=f"check {split}") as bar:
        if workers == 1:
            _init_prepass(listing, max_side, pool=False)
            for i in range(n):
                results.append(_inspect(i))
                bar.update()
        else:
            with mp.Pool(workers, initializer=_init_prepass, initargs=(listing, max_side)) as pool:
                for r in pool.imap_unordered(_inspect, range(n), chunksize=64):
                    results.append(r)
                    bar.update()
    results.sort()
    good = [i for i, size, _, bad in results if bad is None]
    skipped = [{"index": i, "file": listing.files[i], "reason": bad} for i, _, _, bad in results if bad is not None]
    converted = [{"index": i, "file": listing.files[i], "reason": c} for i, _, c, bad in results if bad is None and c]
    if not good:
        raise LayoutError(f"no readable images in {listing.split_dir}")

    tmp = out.with_name(out.name + ".tmp")
    failed = mp.Value("b", 0)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    page = _page_size([size for _, size, _, bad in results if bad is None], max_side)
    writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=workers)
    writer.from_indexed_dataset(_Prepared(listing, max_side, failed), indices=good, chunksize=100)
    if failed.value:
        tmp.unlink()
        raise SourceChanged(f"a file under {listing.split_dir} changed during the run: run again")
    os.replace(tmp, out)

    sha, size = sha256_file(out)
    manifest = {
        "format": FORMAT, "split": split, "num_samples": len(good), "num_files": n, "max_side": max_side,
        "jpeg_quality": jpeg_quality, "write_mode": write_mode,
        "compress_probability": compress_probability if write_mode == "proportion" else None, "sha256": sha, "bytes": size, "classes": listing.classes,
        "skipped": skipped, "converted": converted,
    }
    if listing.unlabelled:  # only then: a labelled sidecar keeps its keys
        manifest["unlabelled"] = listing.unlabelled
    write_atomic(out.with_name(out.name + ".json"), dump_json(manifest))
    return manifest


def main(argv=None) -> int:
    p = writer_parser("python -m data_prep.ffcv", __doc__.split("\n")[0], "output .beton file", quality=90)
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES,
                   help="jpg: every image JPEG-encoded (smallest); raw: pixels (no decode, ~5x the bytes); "
                        "proportion: JPEG with probability --compress-probability, else raw (FFCV's ImageNet recipe)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="proportion mode: share of JPEG-encoded images")
    a = p.parse_args(argv)
    try:
        m = write_beton(a.src, a.split, a.out, a.max_side, a.jpeg_quality, a.workers, write_mode=a.write_mode,
                        compress_probability=a.compress_probability)
    except (LayoutError, SourceChanged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "unlabelled " if m.get("unlabelled") else ""
    print(f"wrote {m['num_samples']} {kind}samples to {a.out} ({len(m['converted'])} converted, {len(m['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

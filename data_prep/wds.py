"""ImageNet folder -> WebDataset tar shards (the format mimscale's trainer reads).

    python -m data_prep.wds --src <ImageNet root> --split train|val --out <dir>
        [--shard-size 1000] [--max-side N] [--workers N] [--seed 0] [--jpeg-quality 95] [--reencode]

``--src`` is listed as the trainer lists ``data.path`` (mimscale.data.imagenet.list_folder):
``<src>/<split>`` when that folder exists, else ``<src>`` itself, in any layout it reads, including
a plain folder of unlabelled images at any depth (every label -1: ``.cls`` is ``-1``, the JSON's
wnid null, the manifest's classes empty and its "unlabelled" the reason).

Layout of ``<out>``:

- ``<split>-NNNNNN.tar`` (``%06d``): plain uncompressed ustar. Shard k holds the samples at
  positions [k*shard_size, (k+1)*shard_size) of the sample order, minus skipped files, so it may
  hold fewer than shard_size. Order: train = ``np.random.default_rng(seed).permutation(N)`` of
  the global indices (class-sorted order would put one class per shard); val = sorted indices.
  Per sample, in this order: ``<key>.jpg`` (JPEG bytes: the original file when usable as-is, see
  data_prep.images; with ``--reencode`` every image re-encoded at --jpeg-quality with 4:2:0 chroma,
  as FFCV's writer does: smaller and faster to decode, at the cost of one more lossy encode), ``<key>.cls`` (ASCII decimal class index), ``<key>.json`` (UTF-8:
  {"index", "wnid", "file" (relative to the split folder), "width", "height" (original size)}
  plus "converted": reason when the file needed a format conversion, see data_prep.images; a
  ``--max-side`` downsizing alone is no conversion: the JPEG's size against width/height shows it). key = ``%08d`` of
  the global index. Headers are fixed (mtime 0, uid/gid 0, empty names, mode 0o444).
- ``<split>-NNNNNN.tar.json``: the shard's sidecar {"name", "count", "sha256", "bytes",
  "skipped", "converted", "options"}. A shard is complete iff its .tar and sidecar both exist
  (each is written as ``.tmp`` and renamed, the sidecar last).
- ``<split>-manifest.json``: written when every shard is complete, {"format": "mimscale-wds/1",
  "split", "num_samples", "num_files", "shard_size", "max_side", "seed", "jpeg_quality", "reencode",
  "listing_sha256", "classes", "shards": [{"name", "count", "sha256", "bytes"}], "skipped",
  "converted"} (lists of {"index", "file", "reason"}), plus "unlabelled" (why) for an unlabelled folder.

A rerun keeps complete shards, removes stale ``.tmp`` files and writes the rest; the result is
byte-identical to an uninterrupted run. It refuses to mix options (split, shard size, max side,
seed, quality, re-encoding, the source listing) with shards already there. One writer per folder at a time.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from tqdm import tqdm

from data_prep.images import Unusable, prepare_jpeg
from data_prep.manifest import default_workers, dump_json, read_json, sha256_file, write_atomic, writer_parser
from mimscale.data.imagenet import LayoutError, Listing, list_folder

FORMAT = "mimscale-wds/1"


class OptionsMismatch(ValueError):
    """Shards already in the output folder were written with other options."""


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}-manifest.json"


def sample_order(n: int, split: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) if split == "train" else np.arange(n)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _write_shard(listing: Listing, out: Path, k: int, indices: list[int], opts: dict) -> dict:
    """Write shard k (tmp + rename, then its sidecar); returns the sidecar. Never raises for a
    single bad sample: it is skipped with a reason."""
    name = shard_name(listing.split, k)
    tmp = out / (name + ".tmp")
    skipped, converted = [], []
    count = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for gi in indices:
                rel = listing.files[gi]
                try:
                    prep = prepare_jpeg(listing.read(gi), opts["max_side"], opts["jpeg_quality"], opts.get("reencode", False))
                except Unusable as e:
                    skipped.append({"index": gi, "file": rel, "reason": str(e)})
                    continue
                except Exception as e:  # unreadable file, or a decoder bug: one sample never stops the job
                    skipped.append({"index": gi, "file": rel, "reason": f"{type(e).__name__}: {e}"[:200]})
                    continue
                meta = {"index": gi, "wnid": listing.wnid(gi), "file": rel, "width": prep.width, "height": prep.height}
                if prep.converted:
                    meta["converted"] = prep.converted
                    converted.append({"index": gi, "file": rel, "reason": prep.converted})
                key = f"{gi:08d}"
                tar.addfile(*_member(key + ".jpg", prep.data))
                tar.addfile(*_member(key + ".cls", str(int(listing.labels[gi])).encode()))
                tar.addfile(*_member(key + ".json", json.dumps(meta, separators=(",", ":")).encode()))
                count += 1
        f.flush()
        os.fsync(f.fileno())
    sha, size = sha256_file(tmp)
    os.replace(tmp, out / name)
    side = {"name": name, "count": count, "sha256": sha, "bytes": size, "skipped": skipped, "converted": converted, "options": opts}
    write_atomic(out / (name + ".json"), dump_json(side))
    return side


_WORKER: dict = {}  # listing, out, opts in each pool process (inherited once, not sent per task)


def _init_worker(listing: Listing, out: Path, opts: dict) -> None:
    cv2.setNumThreads(1)  # one process per core already
    _WORKER.update(listing=listing, out=out, opts=opts)


def _task(job: tuple[int, list[int]]) -> tuple[int, dict]:
    k, indices = job
    return k, _write_shard(_WORKER["listing"], _WORKER["out"], k, indices, _WORKER["opts"])


def _check_existing(out: Path, split: str, opts: dict) -> None:
    """Refuse to add shards to a folder whose shards or manifest were written with other options."""
    for path in sorted(out.glob(f"{split}-[0-9]*.tar.json")) + [out / manifest_name(split)]:
        if not path.is_file():
            continue
        try:
            old = read_json(path)
        except ValueError:  # unreadable sidecar: that shard is simply rewritten
            continue
        old = old.get("options", old)
        diff = {k: (old.get(k), v) for k, v in opts.items() if old.get(k) != v}
        if diff:
            pretty = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise OptionsMismatch(f"{path} was written with other options ({pretty}); use another --out or delete it")


def _complete(out: Path, name: str, opts: dict) -> Optional[dict]:
    side_path = out / (name + ".json")
    tar_path = out / name
    if not (side_path.is_file() and tar_path.is_file()):
        return None
    try:
        side = read_json(side_path)
    except ValueError:
        return None
    if side.get("options") != opts or tar_path.stat().st_size != side.get("bytes"):
        return None
    return side


def write_shards(
    src: str | Path,
    split: str,
    out: str | Path,
    shard_size: int = 1000,
    max_side: Optional[int] = None,
    workers: Optional[int] = None,
    seed: int = 0,
    jpeg_quality: int = 95,
    progress: bool = True,
    reencode: bool = False,
) -> dict:
    """Write (or finish) the shards of ``<src>/<split>`` into ``out``; returns the manifest."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    listing = list_folder(src, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(listing)
    opts = {
        "format": FORMAT, "split": split, "shard_size": shard_size, "max_side": max_side, "seed": seed,
        "jpeg_quality": jpeg_quality, "num_files": n, "listing_sha256": listing.fingerprint(),
    }
    if reencode:  # only when set: shards written before the option keep matching their options
        opts["reencode"] = True
    _check_existing(out, split, opts)
    for stale in out.glob(f"{split}-*.tmp"):
        stale.unlink()

    order = sample_order(n, split, seed)
    num_shards = (n + shard_size - 1) // shard_size
    jobs = [(k, order[k * shard_size:(k + 1) * shard_size].tolist()) for k in range(num_shards)]
    sides: dict[int, dict] = {}
    for k, _ in jobs:
        side = _complete(out, shard_name(split, k), opts)
        if side is not None:
            sides[k] = side
    todo = [job for job in jobs if job[0] not in sides]
    workers = default_workers() if workers is None else max(1, workers)

    done = sum(len(idx) for k, idx in jobs if k in sides)
    with tqdm(total=n, initial=done, unit="img", disable=not progress, desc=f"wds {split}") as bar:
        if workers == 1 or len(todo) <= 1:  # in this process: no pool start-up for one shard
            results = ((k, _write_shard(listing, out, k, idx, opts)) for k, idx in todo)
            for k, side in results:
                sides[k] = side
                bar.update(len(jobs[k][1]))
        else:
            with mp.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(listing, out, opts)) as pool:
                for k, side in pool.imap_unordered(_task, todo):
                    sides[k] = side
                    bar.update(len(jobs[k][1]))

    shards = [sides[k] for k in range(num_shards)]
    manifest = {
        "format": FORMAT,
        "split": split,
        "num_samples": sum(s["count"] for s in shards),
        "num_files": n,
        "shard_size": shard_size,
        "max_side": max_side,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
        "reencode": reencode,
        "listing_sha256": opts["listing_sha256"],
        "classes": listing.classes,
        "shards": [{k: s[k] for k in ("name", "count", "sha256", "bytes")} for s in shards],
        "skipped": sorted((e for s in shards for e in s["skipped"]), key=lambda e: e["index"]),
        "converted": sorted((e for s in shards for e in s["converted"]), key=lambda e: e["index"]),
    }
    if listing.unlabelled:  # only then: a labelled manifest keeps its bytes
        manifest["unlabelled"] = listing.unlabelled
    write_atomic(out / manifest_name(split), dump_json(manifest))
    return manifest


def main(argv=None) -> int:
    p = writer_parser("python -m data_prep.wds", __doc__.split("\n")[0], "output folder", quality=95)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="train shuffle seed")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode every image at --jpeg-quality with 4:2:0 chroma, as FFCV's writer does (faster to decode)")
    a = p.parse_args(argv)
    try:
        m = write_shards(a.src, a.split, a.out, a.shard_size, a.max_side, a.workers, a.seed, a.jpeg_quality,
                         reencode=a.reencode)
    except (LayoutError, OptionsMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_samples']} {'unlabelled ' if m.get('unlabelled') else ''}samples in {len(m['shards'])} shards "
          f"({len(m['converted'])} converted, {len(m['skipped'])} skipped) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check what data_prep.wds or data_prep.ffcv wrote.

    python -m data_prep.verify <dir or file.beton> [--workers N]

Prints each problem (``<shard or file>: <sample>: <reason>``) and a summary; exit status 1 when
there is any problem, 0 otherwise.

A folder: for each ``*-manifest.json``, every listed shard must exist with the recorded size,
sha256 and sample count; each sample must be exactly ``<key>.jpg``, ``<key>.cls``,
``<key>.json`` in that order, with key = ``%08d`` of the JSON's index, the class an int in range
whose wnid matches the JSON, and a JPEG that decodes (simplejpeg strict, else PIL loading it
fully: the trainer's rule). Every source file must be written once or listed as skipped. Shard
files named in no manifest are reported. Shards are checked in parallel.

A .beton: size and sha256 against ``<file>.json``, then ffcv.reader.Reader's header, fields and
sample count, then every image. Images are read as the raw stored bytes (metadata data_ptr ->
the allocation table's size) from a memory map and decoded here rather than through an FFCV
Loader: no numba pipeline to compile, a corrupt JPEG is reported with its sample id (FFCV's
decoder does not report one), and it is the same decoder check as for shards.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import simplejpeg
from tqdm import tqdm

from data_prep.images import check_jpeg
from data_prep.manifest import default_workers, read_json, sha256_file
from mimscale.data.sources import beton_problem

MAX_PER_UNIT = 20  # problems listed per shard / chunk before "... and N more"


def _cap(problems: list[str], where: str) -> list[str]:
    if len(problems) <= MAX_PER_UNIT:
        return problems
    return problems[:MAX_PER_UNIT] + [f"{where}: ... and {len(problems) - MAX_PER_UNIT} more problems"]


def _check_sample(name: str, key: str, members: dict, num_classes: int, classes: list[str]) -> tuple[Optional[int], list[str]]:
    where = f"{name}: {key}"
    out = []
    if list(members) != ["jpg", "cls", "json"]:
        return None, [f"{where}: members {list(members)}, expected ['jpg', 'cls', 'json']"]
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        index = int(meta["index"])
    except Exception as e:
        return None, [f"{where}: bad json ({type(e).__name__}: {e})"]
    if key != f"{index:08d}":
        out.append(f"{where}: key does not match json index {index}")
    try:
        cls = int(members["cls"].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        cls = None
        out.append(f"{where}: cls {members['cls'][:20]!r} is not an int")
    if cls is not None and not classes:  # an unlabelled folder's shards: label -1, no wnid
        if cls != -1 or meta.get("wnid") is not None:
            out.append(f"{where}: cls {cls}, json wnid {meta.get('wnid')!r} in unlabelled shards (expected -1 and null)")
    elif cls is not None and not 0 <= cls < num_classes:
        out.append(f"{where}: cls {cls} out of range [0, {num_classes})")
    elif cls is not None and meta.get("wnid") != classes[cls]:
        out.append(f"{where}: json wnid {meta.get('wnid')!r} is not class {cls} ({classes[cls]})")
    bad = check_jpeg(members["jpg"])
    if bad:
        out.append(f"{where}: {bad}")
    return index, out


def check_shard(path: str, expect: dict, classes: list[str]) -> tuple[str, list[str], list[int]]:
    """(name, problems, global indices found) for one shard listed in a manifest."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        return name, [f"{name}: missing"], []
    problems = []
    sha, size = sha256_file(path)
    if size != expect["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {expect['bytes']}")
    if sha != expect["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    indices: list[int] = []
    key, members = None, {}

    def flush():
        if key is not None:
            idx, p = _check_sample(name, key, members, len(classes), classes)
            problems.extend(p)
            if idx is not None:
                indices.append(idx)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    problems.append(f"{name}: {m.name}: not a regular file")
                    continue
                k, _, ext = m.name.partition(".")
                if k != key:
                    flush()
                    key, members = k, {}
                if ext in members:
                    problems.append(f"{name}: {k}: member .{ext} twice")
                members[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
    flush()
    if len(indices) != expect["count"]:
        problems.append(f"{name}: {len(indices)} samples, manifest says {expect['count']}")
    return name, _cap(problems, name), indices


def _shard_task(args):
    return check_shard(*args)


def _pool_map(fn, jobs: list, workers: int, desc: str):
    with tqdm(total=len(jobs), desc=desc, unit="shard" if desc.startswith("shards") else "chunk") as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        with mp.Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap_unordered(fn, jobs):
                yield r
                bar.update()


def verify_dir(folder: str | Path, workers: Optional[int] = None) -> tuple[list[str], int]:
    """(problems, samples checked) for a folder of WebDataset shards."""
    folder = Path(folder)
    workers = workers or default_workers()
    manifests = sorted(folder.glob("*-manifest.json"))
    if not manifests:
        return [f"{folder}: no *-manifest.json (an unfinished run? rerun the writer)"], 0
    problems, listed, samples = [], set(), 0
    for mpath in manifests:
        try:
            man = read_json(mpath)
            shards, classes, n = man["shards"], man["classes"], int(man["num_files"])
        except Exception as e:
            problems.append(f"{mpath.name}: unreadable manifest ({type(e).__name__}: {e})")
            continue
        listed.update(s["name"] for s in shards)
        jobs = [(str(folder / s["name"]), s, classes) for s in shards]
        seen = np.zeros(n, np.int64)
        for name, p, idx in _pool_map(_shard_task, jobs, workers, f"shards {mpath.name}"):
            problems.extend(p)
            idx = np.asarray(idx, np.int64)
            out_of_range = idx[(idx < 0) | (idx >= n)]
            if len(out_of_range):
                problems.append(f"{name}: indices {out_of_range[:5].tolist()} outside [0, {n})")
            np.add.at(seen, idx[(idx >= 0) & (idx < n)], 1)
            samples += len(idx)
        for e in man.get("skipped", []):
            if 0 <= e["index"] < n:
                seen[e["index"]] += 1
        if (seen > 1).any():
            problems.append(f"{mpath.name}: indices written more than once: {np.flatnonzero(seen > 1)[:10].tolist()}")
        if (seen == 0).any():
            problems.append(f"{mpath.name}: {int((seen == 0).sum())} source files neither written nor skipped, "
                            f"e.g. indices {np.flatnonzero(seen == 0)[:10].tolist()}")
        if sum(s["count"] for s in shards) != man.get("num_samples"):
            problems.append(f"{mpath.name}: num_samples {man.get('num_samples')} != sum of shard counts")
    for tar in sorted(folder.glob("*.tar")):
        if tar.name not in listed:
            problems.append(f"{tar.name}: shard file in no manifest")
    return problems, samples


def _beton_chunk(args) -> list[str]:
    """Decode the stored images of one chunk of samples: rows (sample id, ptr, size, mode, h, w)."""
    path, rows = args
    name = Path(path).name
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for sid, ptr, size, mode, h, w in rows:
        where = f"{name}: sample {sid}"
        if size < 0 or ptr + size > len(data):
            out.append(f"{where}: image bytes outside the file")
            continue
        blob = data[ptr:ptr + size].tobytes()
        if mode == 1:  # raw pixels
            if size != h * w * 3:
                out.append(f"{where}: raw image of {size} bytes for {w}x{h}")
            continue
        bad = check_jpeg(blob)
        if bad:
            out.append(f"{where}: {bad}")
            continue
        try:
            hh, ww, _, _ = simplejpeg.decode_jpeg_header(blob)
        except ValueError:
            continue  # PIL decoded it (check_jpeg); size checked by metadata only
        if (hh, ww) != (h, w):
            out.append(f"{where}: JPEG is {ww}x{hh}, metadata says {w}x{h}")
    return _cap(out, name)


def verify_beton(path: str | Path, workers: Optional[int] = None, chunk: int = 256) -> tuple[list[str], int]:
    """(problems, samples checked) for a .beton written by data_prep.ffcv."""
    path = Path(path)
    name = path.name
    workers = workers or default_workers()
    if not path.is_file():
        return [f"{name}: missing"], 0
    side = path.with_name(name + ".json")
    structure = beton_problem(path, sidecar=False)  # a truncated file: said plainly, not as the reader's numpy error
    broken = [f"{name}: {structure}; the file is truncated or corrupt: rewrite it (python -m data_prep.ffcv) or copy it again"] if structure else []
    if not side.is_file():
        return [f"{name}: no sidecar {side.name}"] + broken, 0
    problems = []
    man = read_json(side)
    sha, size = sha256_file(path)
    if size != man["bytes"]:
        problems.append(f"{name}: {size} bytes, {side.name} says {man['bytes']}")
    if sha != man["sha256"]:
        problems.append(f"{name}: sha256 differs from {side.name}")
    if broken:
        return problems + broken, 0
    from ffcv.reader import Reader  # imported here: numba start-up is slow

    try:
        reader = Reader(str(path))
        fields = list(reader.field_names)
        if fields != ["image", "label", "index"]:
            return problems + [f"{name}: fields {fields}, expected ['image', 'label', 'index']"], 0
        md, alloc = reader.metadata, reader.alloc_table
        image, labels, index = md["f0"], md["f1"], md["f2"]
    except Exception as e:
        return problems + [f"{name}: unreadable by ffcv.reader.Reader ({type(e).__name__}: {e})"], 0
    n_samples, n_files, n_classes = len(md), int(man["num_files"]), len(man["classes"])
    if n_samples != man["num_samples"]:
        problems.append(f"{name}: {n_samples} samples, {side.name} says {man['num_samples']}")
    if n_samples and not (np.diff(index) > 0).all():
        problems.append(f"{name}: indices not strictly increasing")
    if n_samples and (index.min() < 0 or index.max() >= n_files):
        problems.append(f"{name}: indices outside [0, {n_files})")
    if n_samples and not n_classes and (labels != -1).any():
        problems.append(f"{name}: labels other than -1 in an unlabelled .beton (its sidecar lists no classes)")
    elif n_samples and n_classes and (labels.min() < 0 or labels.max() >= n_classes):
        problems.append(f"{name}: labels outside [0, {n_classes})")
    if set(index.tolist()) & {e["index"] for e in man["skipped"]}:
        problems.append(f"{name}: holds samples its sidecar lists as skipped")
    if n_samples + len(man["skipped"]) != n_files:
        problems.append(f"{name}: {n_samples} samples + {len(man['skipped'])} skipped != {n_files} files")
    order = np.argsort(alloc["ptr"])
    ptrs, sizes = alloc["ptr"][order], alloc["size"][order]
    pos = np.clip(np.searchsorted(ptrs, image["data_ptr"]), 0, max(len(ptrs) - 1, 0))
    found = len(ptrs) > 0 and ptrs[pos] == image["data_ptr"]
    if not np.all(found):
        problems.append(f"{name}: {int((~np.asarray(found)).sum())} images missing from the allocation table")
        return problems, 0
    rows = list(zip(range(n_samples), image["data_ptr"].tolist(), sizes[pos].tolist(),
                    image["mode"].tolist(), image["height"].tolist(), image["width"].tolist()))
    jobs = [(str(path), rows[i:i + chunk]) for i in range(0, n_samples, chunk)]
    for p in _pool_map(_beton_chunk, jobs, workers, f"images {name}"):
        problems.extend(p)
    return problems, n_samples


def verify(path: str | Path, workers: Optional[int] = None) -> tuple[list[str], int]:
    """(problems, samples checked) for a shard folder or a .beton."""
    path = Path(path)
    if path.is_dir():
        return verify_dir(path, workers)
    return verify_beton(path, workers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a folder of WebDataset shards, or a .beton file")
    p.add_argument("--workers", type=int, default=default_workers())
    a = p.parse_args(argv)
    problems, samples = verify(a.path, a.workers)
    for line in problems:
        print(line)
    if problems:
        print(f"FAILED: {len(problems)} problems in {a.path} ({samples} samples checked)")
        return 1
    print(f"ok: {samples} samples checked in {a.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

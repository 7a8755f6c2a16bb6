"""Small file helpers shared by the writers and verify: atomic writes, hashing, worker counts."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def default_workers() -> int:
    """min(8, usable CPUs): the CPUs this process may run on, not the host's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def sha256_file(path: str | Path, block: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def dump_json(obj) -> bytes:
    """Deterministic JSON (key order as built, no timestamps): reruns write identical bytes."""
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``<path>.tmp``, fsync, rename: readers (and reruns) never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def writer_parser(prog: str, description: str, out_help: str, quality: int):
    """The options both writers share: source, split, output, resize, JPEG quality, workers."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--src", required=True, help="ImageNet root (holding train/, val/, synsets.txt), a folder of class folders, "
                   "or a folder of unlabelled images at any depth (used as is when it has no <split>/ folder)")
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--max-side", type=int, default=None, help="downsize so the longest side is at most N")
    p.add_argument("--jpeg-quality", type=int, default=quality, help="quality of the JPEGs it encodes")
    p.add_argument("--workers", type=int, default=default_workers())
    return p

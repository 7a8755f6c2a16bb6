"""Say "the disk is full" when a checkpoint write fails because it is.

A full file system reaches mimscale in several disguises: ``OSError(ENOSPC)`` or ``EDQUOT`` from
a plain write, but from ``torch.save`` usually a RuntimeError of its zip writer
("[enforce fail at inline_container.cc:...] unexpected pos 8512 vs 8404" or "file write
failed"), which names neither the cause nor the path. ``explain_write_error`` turns any of them
into ``CheckpointDiskFull`` naming the file, its file system and the free space left.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

# Below this many free bytes after a failed write, the write failed for want of space: torch's zip
# writer reports a short write without errno, and a file system is "full" before it reaches 0 bytes
# (reserved blocks, the block that did not fit).
NEARLY_FULL_BYTES = 64 << 20
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class CheckpointDiskFull(OSError):
    """A checkpoint write failed because its file system (or the user's quota) is full."""


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def explain_write_error(error: BaseException, path: Path) -> BaseException:
    """``CheckpointDiskFull`` (chained to ``error``) when the write of ``path`` failed for want of
    space, else ``error`` itself."""
    free = free_bytes(path)
    by_errno = isinstance(error, OSError) and error.errno in FULL_ERRNOS
    quota = isinstance(error, OSError) and error.errno == errno.EDQUOT
    if not by_errno and (free is None or free >= NEARLY_FULL_BYTES):
        return error
    where = f"{_gib(free)} free there" if free is not None else "free space unknown"
    what = "the disk quota is exhausted" if quota else "the disk is full"
    out = CheckpointDiskFull(errno.EDQUOT if quota else errno.ENOSPC,
                             f"checkpoint write failed: {what} writing {path} ({where}; {type(error).__name__}: {error}). "
                             "Free space or point output_dir at a larger file system, then run the same command "
                             "again: it resumes from the newest complete checkpoint (this save has no COMPLETE marker)")
    out.__cause__ = error
    return out

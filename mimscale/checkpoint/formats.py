"""Format versions of what mimscale writes for later readers: checkpoints (the tag's ``COMPLETE``
marker) and exports (``mimscale.json``).

Each carries ``format_version`` (an integer, raised when a change would make an older reader
misread the files) and ``mimscale_version`` (the package that wrote it, for the message). A reader
takes its own version and every older one (files without the key predate versioning: version 0,
which today's readers still read); a newer one is refused with FormatVersionError naming the file,
the version found, the newest this mimscale reads and the fix (a newer mimscale).
"""
from __future__ import annotations

from pathlib import Path

from mimscale import __version__

KEY = "format_version"
WRITER_KEY = "mimscale_version"
# What this mimscale writes, and the newest it reads.
SUPPORTED = {"checkpoint": 1, "export": 1}


class FormatVersionError(ValueError):
    """Files written in a format newer than this mimscale reads."""


def stamp(kind: str, meta: dict) -> dict:
    """``meta`` with this mimscale's format version of ``kind`` and its package version."""
    return {**meta, KEY: SUPPORTED[kind], WRITER_KEY: __version__}


def check(kind: str, meta: dict, where: str | Path) -> int:
    """The format version ``meta`` (a marker's or mimscale.json's content) records for ``kind``
    ("checkpoint" or "export"), 0 when it records none; FormatVersionError when it is newer than
    this mimscale reads, or not a version at all."""
    found = meta.get(KEY, 0) if isinstance(meta, dict) else 0
    if isinstance(found, bool) or not isinstance(found, int) or found < 0:
        raise FormatVersionError(f"{where}: {KEY} {found!r} is not a format version (a non-negative integer): "
                                 f"the file is damaged or was not written by mimscale")
    supported = SUPPORTED[kind]
    if found > supported:
        writer = meta.get(WRITER_KEY, "a newer mimscale")
        raise FormatVersionError(f"{where}: {kind} format version {found} (written by mimscale {writer}); this mimscale "
                                 f"({__version__}) reads {kind} format versions 0 to {supported}: read it with a newer mimscale "
                                 f"(CHANGELOG.md names the release of each format version)")
    return found

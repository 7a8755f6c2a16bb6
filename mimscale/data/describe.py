"""What a run trains on, for the record (MLflow's dataset input, see tracking.Tracker.log_dataset).

``describe(data_cfg, source)`` -> a ``DatasetRecord``: a name, a digest that changes whenever the
data can have, where it is, and its counts. Per ``data.source``:
  - ``wds``: the digest is that of ``<split>-manifest.json`` (data_prep.wds writes it
    deterministically and it lists every shard's sha256, so it identifies the shards' bytes);
    counts from the manifest: samples, shards, classes, files, skipped and converted;
  - ``ffcv``: the digest is that of the ``<file>.beton.json`` sidecar data_prep.ffcv writes beside
    the file (it holds the .beton's sha256); without one, of the file's path, size and mtime;
  - ``folder``: the listing's fingerprint (sha256 of every ``<class>/<file>`` and its label, the
    same one data_prep's manifests record as ``listing_sha256``); counts: samples, classes;
  - ``synthetic``: generated images; the digest is that of (count, size, seed).
Reads only manifests and the listing the source already holds: never the images.

``identity(data_cfg, source)``: what a checkpoint records of its data (the data stream's state,
streams.StreamPosition) so a resume over changed data is noticed: the same digest, except for a
.beton without its sidecar (the count and size only: its path and mtime change with a copy).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

DIGEST_CHARS = 16  # of the sha256 hex; MLflow stores at most 36 characters, its own digests have 8


@dataclass(frozen=True)
class DatasetRecord:
    name: str  # e.g. "imagenet/train"
    sha256: str  # the full digest (of the manifest, listing or settings); ``digest`` is its head
    source_type: str  # "local" (a path, as MLflow's LocalArtifactDatasetSource) or "code" (generated)
    source: dict  # {"uri": <absolute path>} or {"tags": {...}}
    profile: dict = field(default_factory=dict)  # num_samples, num_shards, num_classes, ... (ints and strings)

    @property
    def digest(self) -> str:
        return self.sha256[:DIGEST_CHARS]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _name(path: Path, split: str) -> str:
    return f"{path.name}/{split}" if split else path.name


def _wds(path: Path, split: str) -> DatasetRecord:
    manifest = path if path.is_file() else path / f"{split}-manifest.json"
    raw = manifest.read_bytes()
    m = json.loads(raw)
    shards = [s for s in m.get("shards", []) if s.get("count", 0) > 0]
    profile = {"format": m.get("format"), "manifest": manifest.name, "num_samples": int(m.get("num_samples", 0)),
               "num_shards": len(shards), "num_classes": len(m.get("classes", [])), "num_files": m.get("num_files"),
               "skipped": len(m.get("skipped", [])), "converted": len(m.get("converted", [])),
               "max_side": m.get("max_side"), "manifest_sha256": _sha256(raw)}
    root = manifest.parent
    return DatasetRecord(_name(root, m.get("split", split)), _sha256(raw), "local", {"uri": str(root.resolve())}, profile)


def _ffcv(path: Path, num_samples: int) -> DatasetRecord:
    sidecar = path.with_name(path.name + ".json")
    profile = {"num_samples": num_samples, "num_shards": 1}
    if sidecar.is_file():
        raw = sidecar.read_bytes()
        m = json.loads(raw)
        digest = _sha256(raw)
        profile.update(format=m.get("format"), manifest=sidecar.name, num_classes=len(m.get("classes", [])),
                       num_files=m.get("num_files"), skipped=len(m.get("skipped", [])), converted=len(m.get("converted", [])),
                       max_side=m.get("max_side"), file_sha256=m.get("sha256"), manifest_sha256=digest)
    else:  # a .beton written elsewhere: identified by where and what size it is, not by its bytes (GBs to hash)
        st = path.stat()
        digest = _sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        profile.update(bytes=st.st_size, digest_of="path, size and mtime (no .beton.json sidecar)")
    return DatasetRecord(path.stem, digest, "local", {"uri": str(path.resolve())}, profile)


def describe(data_cfg, source) -> DatasetRecord:
    """The record of ``data_cfg`` (a config's ``data`` section); ``source``: what
    ``mimscale.data.streams.build_source`` built from it (its listing and counts are reused)."""
    kind = data_cfg.source
    if kind == "wds":
        return _wds(Path(data_cfg.path), data_cfg.split)
    if kind == "ffcv":
        return _ffcv(Path(data_cfg.path), len(source))
    if kind == "folder":
        root = Path(source.root)
        profile = {"num_samples": len(source), "num_shards": 0, "num_classes": len(source.classes),
                   "listing_sha256": source.fingerprint()}
        # the class folders' parent: <root>/<split> names itself "<root>/<split>", a bare class-folder root its name
        name = _name(root.parent, root.name) if data_cfg.split and root.name == data_cfg.split else root.name
        return DatasetRecord(name, profile["listing_sha256"], "local", {"uri": str(root.resolve())}, profile)
    if kind == "synthetic":
        settings = {"count": data_cfg.synthetic_count, "size": data_cfg.synthetic_size, "seed": getattr(source, "seed", None)}
        profile = {"num_samples": len(source), "num_shards": 0, "num_classes": 10, **settings}
        return DatasetRecord("synthetic", _sha256(json.dumps(settings, sort_keys=True).encode()), "code",
                             {"tags": {"mimscale.data.source": "synthetic"}}, profile)
    raise ValueError(f"data.source {kind!r}: no dataset record for it (folder, wds, ffcv, synthetic)")


def identity(data_cfg, source) -> dict:
    """{"source", "path", "count", "sha256"} of the data a run reads. Independent of where the data
    lives (a listing's relative paths, a manifest's bytes, a .beton's sha256), so a moved copy
    resumes; any added, removed or renamed file (or relabelled class) changes it."""
    count = len(source)
    if data_cfg.source == "ffcv" and not Path(data_cfg.path).with_name(Path(data_cfg.path).name + ".json").is_file():
        sha = _sha256(f"ffcv|{count}|{Path(data_cfg.path).stat().st_size}".encode())
    else:
        sha = describe(data_cfg, source).sha256
    return {"source": data_cfg.source, "path": str(data_cfg.path), "count": count, "sha256": sha}

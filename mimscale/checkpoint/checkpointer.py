"""Checkpoints: the one owner of resolving, saving, loading, pruning and the completion marker.

A ``Checkpointer`` saves the DeepSpeed engine plus every ``Stateful`` part registered with it
(train counters, data position, a method's hooks, the tracking run id): a part's ``state_dict()``
goes into DeepSpeed's client state under ``mimscale/<name>``, its ``rank_state_dict()`` into that
rank's own file next to the rank's RNG streams.

Layout: ``<output_dir>/checkpoints/step00001234/`` holds DeepSpeed's files, one
``rng_rank<r>.pt`` per rank, and ``COMPLETE``. A save is durable the way PyTorch's distributed
checkpoint publishes one: every rank fsyncs the files it wrote; after a barrier rank 0 writes the
marker (listing every file of the tag with its size) to a temporary name, fsyncs it, renames it
into place and fsyncs the directory. With ``train.ckpt_background`` the ranks' writes run in a
thread (background.py) and "after a barrier" becomes "once the stop request's reduction says every
rank's writer is idle": the marker still comes last. So a tag with a marker has every byte on disk, even after a
node crash or on a write-back file system. Resume picks the newest tag that *verifies* (marker
parses, every listed file there with its size); a damaged tag is moved aside (renamed, never
deleted) with a message naming the bad file, and resume falls back to the next one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from mimscale.checkpoint import formats, safe_load
from mimscale.checkpoint.background import StagingEngine, Writer, stage
from mimscale.checkpoint.disk import explain_write_error
from mimscale.errors import ConfigError
from mimscale.runtime import dist
from mimscale.runtime.stateful import Stateful

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step(\d{8,})$")
# Which rank wrote a file of a tag: DeepSpeed's per-rank shards and our rng files carry the rank;
# the rest (mp_rank_00_model_states.pt under ZeRO-1/2, config.yaml) are rank 0's.
WRITER_RE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(tag_dir: Path) -> dict[str, int]:
    """Every file of a tag (relative path -> size), the marker and its temporary copy left out."""
    return {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*"))
            if f.is_file() and f.name not in (MARKER, MARKER + ".tmp")}


class DamagedCheckpoint(FileNotFoundError):
    """A tag whose marker is torn or whose files are not all there at their sizes."""


def verify(tag_dir: Path) -> Optional[str]:
    """None when the tag is whole, else what is wrong with it (naming the file)."""
    try:
        text = (tag_dir / MARKER).read_text()
        marker = json.loads(text)
    except (OSError, json.JSONDecodeError):
        return f"{tag_dir / MARKER} is empty or torn"
    if not isinstance(marker, dict):
        return f"{tag_dir / MARKER} is empty or torn"
    for name, size in marker.get("files", {}).items():  # markers written before durable saves list none
        f = tag_dir / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, the marker says {size}"
    return None


def set_aside(tag_dir: Path, why: str) -> Path:
    """Rank 0 moves a damaged tag out of the way (kept for inspection, never deleted)."""
    dest = tag_dir.with_name(f"{tag_dir.name}.damaged-{int(time.time())}")
    if dist.is_rank0():
        try:
            tag_dir.rename(dest)
        except OSError:  # another process moved it first
            pass
        dist.log0(f"[mimscale] WARNING: checkpoint {tag_dir.name} is damaged ({why}); moved to {dest.name}, "
                  "resuming from the newest whole checkpoint before it")
    return dest


def newest_verified(root: Path, repair: bool = False) -> Optional[Path]:
    """The newest complete tag under ``root`` that verifies. Damaged newer ones are skipped with a
    message naming the bad file, and with ``repair`` (a training run resuming) also set aside."""
    for _, d in reversed(complete_tags(root)):
        problem = verify(d)
        if problem is None:
            return d
        if repair:
            set_aside(d, problem)
        else:
            dist.log0(f"[mimscale] WARNING: skipping damaged checkpoint {d} ({problem})")
    return None


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_tags(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and (d / MARKER).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def resolve_resume(resume: str, output_dir: str | Path, repair: bool = False) -> Optional[Path]:
    """The checkpoint directory (one tag) to resume from, or None for a fresh start.

    ``auto``: the newest complete checkpoint in output_dir, if any; ``never``: None; a path: that
    tag directory, or the newest complete tag inside a ``checkpoints`` directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_verified(checkpoint_root(output_dir), repair)
    p = Path(resume)
    if (p / MARKER).is_file():
        problem = verify(p)
        if problem:
            raise DamagedCheckpoint(f"{resume} is a damaged checkpoint: {problem}")
        return p
    for root in (p, p / "checkpoints"):
        if complete_tags(root):
            tag = newest_verified(root, repair)
            if tag is not None:
                return tag
    raise FileNotFoundError(f"resume={resume!r} holds no complete checkpoint (a directory with a {MARKER} file)")


def check_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """Resolve ``resume`` before anything is built, as a ConfigError when it cannot work: a path
    without a complete checkpoint, or ``never`` over an output_dir that holds another run's
    checkpoints (it would mix the two). Another world size or ZeRO stage is elastic.py's."""
    if resume == "never":
        tags = complete_tags(checkpoint_root(output_dir))
        if tags:
            raise ConfigError(
                f"config key 'resume' = 'never' but output_dir {output_dir} holds checkpoints of an earlier run "
                f"(latest {tags[-1][1].name}): use resume=auto to continue it, or choose a new output_dir")
        return None
    try:
        return resolve_resume(resume, output_dir, repair=True)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


def abandon_newer(output_dir: str | Path, step: int) -> None:
    """Resuming from an older checkpoint (a roll-back): newer complete tags are renamed, not
    deleted, so they are never picked as latest and never overwritten half-way."""
    for s, d in complete_tags(checkpoint_root(output_dir)):
        if s > step:
            d.rename(d.with_name(f"{d.name}.abandoned-{int(time.time())}"))


def rng_state() -> dict:
    """This process's RNG streams in what torch's weights-only unpickler reads (so a rank file never
    needs more): python's state is ints already; numpy's (name, key, pos, has_gauss, cached_gaussian)
    keeps its uint32 key as a tensor instead of an ndarray."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.copy()), int(pos), int(has_gauss),
                                                    float(cached_gaussian)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved (or a rank file written before it, numpy's key an ndarray)."""
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy() if torch.is_tensor(key) else key, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CONFIG = "config.yaml"  # the run's resolved config, beside the weights (export and eval read the model from it)
CLIENT_KEY = "mimscale"  # our parts' states in DeepSpeed's client state (which it mixes with its own keys)
# Stage 0 (the client optimizer's own state dict): the parameter names of each optimizer group, in
# the order of its state indices. DeepSpeed records them (``param_shapes``) only for ZeRO; elastic.py
# needs them to turn a stage-0 checkpoint into a universal one for a ZeRO resume.
PARAM_NAMES_KEY = "mimscale_param_names"


def optimizer_param_names(engine) -> Optional[list[list[str]]]:
    """[[name, ...] per param group] of a stage-0 engine's client optimizer; None under ZeRO
    (its optimizer holds flat partitions; DeepSpeed's own ``param_shapes`` names them)."""
    if int(engine.zero_optimization_stage()) != 0 or not isinstance(engine.optimizer, torch.optim.Optimizer):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in engine.optimizer.param_groups]
    # a parameter outside the module (none in mimscale): no names, the checkpoint resumes on stage 0 only
    return None if any(n is None for g in groups for n in g) else groups


def read_marker(tag_dir: Path) -> dict:
    """The facts in a tag's completion marker ({step, time, world_size, ...})."""
    text = (tag_dir / MARKER).read_text()
    try:
        marker = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        marker = {}
    if "step" not in marker:  # older markers: the tag's name says the step
        m = TAG_RE.match(tag_dir.name)
        marker["step"] = int(m.group(1)) if m else 0
    return marker


@dataclass
class TrainState(Stateful):
    """The loop's counters (the same on every rank): checkpoint part ``train``."""

    step: int = 0
    samples_seen: int = 0
    skipped: int = 0  # unreadable images skipped so far
    converted: int = 0  # images converted to RGB so far

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped": self.skipped, "converted": self.converted}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.skipped, self.converted = int(state["skipped"]), int(state["converted"])


@dataclass
class TrackingState(Stateful):
    """The MLflow run a resumed run keeps logging into: checkpoint part ``tracking``."""

    run_id: Optional[str] = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["run_id"]


def _legacy_parts(client: dict, rank_state: dict) -> tuple[dict, dict]:
    """Checkpoints written before the Checkpointer kept flat client keys: map them to parts."""
    parts = {
        "train": {"step": client["mim_step"], "samples_seen": client["mim_samples_seen"],
                  "skipped": client.get("mim_skipped_images", 0), "converted": client.get("mim_converted_images", 0)},
        "tracking": {"run_id": client.get("mim_mlflow_run_id")},
        "data": {},  # per rank only
        "method": {"generation": client["amt_generation"], "refreshes": client.get("amt_refreshes", [])}
        if "amt_generation" in client else {},
    }
    return parts, {"data": rank_state.get("data") or {}, "method": rank_state.get("method") or {}}


class Checkpointer:
    """Saves and restores the engine and every registered part, under ``<output_dir>/checkpoints``.

    ``save`` runs on every rank (DeepSpeed requires it); ``restore`` loads one tag on every rank.
    ``background``: saves return once staged and are written by a thread (background.py)."""

    def __init__(self, engine, output_dir: str | Path, keep: int, config: Optional[dict] = None,
                 background: bool = False):
        self.engine = engine
        self.background = background
        self.pending: Optional[tuple[Path, dict]] = None  # (tag directory, marker facts) of a save without its marker
        self._bg: Optional[Writer] = None
        self.out = Path(output_dir)
        self.root = checkpoint_root(output_dir)
        self.keep = keep
        self.config = config
        self.parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful) -> None:
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} is registered twice")
        self.parts[name] = part

    def save(self, step: int, marker_extra: Optional[dict] = None) -> Path:
        """Every rank writes its files; rank 0 writes the config and, after all ranks are done, the
        marker (``marker_extra``: small facts readable without loading, e.g. AMT's store generation);
        older tags beyond ``keep`` are pruned. Returns the tag directory.

        In the background mode this returns once the files are staged (background.py): the tag is
        then *pending* and gets its marker from ``publish_pending`` (every rank agreed its writer is
        idle) or ``finish_pending`` (a collective wait). A save first finishes the pending one."""
        self.finish_pending()
        tag = tag_for(step)
        tag_dir = self.root / tag
        if dist.is_rank0() and tag_dir.exists():
            shutil.rmtree(tag_dir)  # never write into a folder that may already say COMPLETE
        dist.barrier()
        client = {CLIENT_KEY: {name: part.state_dict() for name, part in self.parts.items()}}
        names = optimizer_param_names(self.engine)
        if names is not None:
            client[PARAM_NAMES_KEY] = names
        rank_file = tag_dir / f"rng_rank{dist.rank()}.pt"
        rank_state = {name: part.rank_state_dict() for name, part in self.parts.items()}
        if self.background:
            live = self.engine.checkpoint_engine
            self.engine.checkpoint_engine = StagingEngine(self._writer())
            try:
                self.engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
            finally:
                self.engine.checkpoint_engine = live
            self._writer().put(stage({**rng_state(), "rank_state": rank_state}), rank_file)
        else:
            try:
                self.engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
                torch.save({**rng_state(), "rank_state": rank_state}, rank_file)
            except (OSError, RuntimeError) as e:
                _reraise_explained(e, tag_dir)
        if dist.is_rank0() and self.config is not None:
            try:
                (tag_dir / CONFIG).write_text(yaml.safe_dump(self.config, sort_keys=False))
            except OSError as e:
                _reraise_explained(e, tag_dir / CONFIG)
        facts = {"step": step, "world_size": dist.world_size(), "zero_stage": int(self.engine.zero_optimization_stage()),
                 **(marker_extra or {})}
        self.pending = (tag_dir, facts)
        if self.background:
            return tag_dir
        _fsync_written(tag_dir, dist.rank())
        dist.barrier()  # every rank's files are on disk before the marker says so
        self.publish_pending()
        dist.barrier()
        return tag_dir

    def pending_step(self) -> Optional[int]:
        """The step of the save whose files are still being written (no marker yet), or None."""
        return self.pending[1]["step"] if self.pending else None

    def writing(self) -> bool:
        """Whether this rank's files of the pending save are still being written (never blocks;
        raises the writer's error, e.g. a full disk, in the training thread)."""
        return self.pending is not None and self._bg is not None and not self._bg.idle()

    def publish_pending(self) -> Optional[Path]:
        """Every rank, once every rank's files of the pending save are on disk (agreed by the
        caller: a barrier, or the stop request's reduction): rank 0 publishes the marker and prunes.
        Returns the tag directory, or None when nothing was pending."""
        if self.pending is None:
            return None
        tag_dir, facts = self.pending
        self.pending = None
        if dist.is_rank0():
            if self.background:  # config.yaml and DeepSpeed's recovery scripts, written outside the writer
                _fsync_written(tag_dir, 0)
            fsync_path(tag_dir)  # the files' directory entries (each file was fsynced by its writer)
            _publish_marker(tag_dir, {**facts, "time": time.time(), "files": _files(tag_dir)})
            _prune(self.root, self.keep)
        return tag_dir

    def finish_pending(self) -> Optional[Path]:
        """Every rank: wait for this rank's writer, then publish the pending save (collective).
        Returns its tag directory, or None when nothing was pending."""
        if self.pending is None:
            return None
        if self._bg is not None:
            self._bg.wait()
        dist.barrier()
        path = self.publish_pending()
        dist.barrier()
        return path

    def close(self) -> None:
        """Stop the writer thread (after ``finish_pending``: a pending save left here never gets a
        marker, which is what a crash would leave too)."""
        if self._bg is not None:
            self._bg.close()
            self._bg = None

    def _writer(self) -> Writer:
        if self._bg is None:
            # the fsync looked up at call time: the fault suite holds a save there (tests/faults)
            self._bg = Writer(lambda path: _fsync_file(path))
        return self._bg

    def restore(self, tag_dir: Path, universal: Optional[Path] = None) -> None:
        """Load weights, optimizer, scheduler and every registered part; restore this rank's RNG
        streams. Rank 0 first renames complete tags newer than this one (a roll-back), so they are
        never picked as latest nor overwritten half-way. ``universal``: the tag converted for
        another world size or ZeRO stage (elastic.py), loaded instead of the tag's own ZeRO files;
        per-rank state (RNG streams, a part's ``rank_state_dict``) then starts fresh."""
        if dist.is_rank0():
            abandon_newer(self.out, read_marker(tag_dir)["step"])
        source = universal or tag_dir
        with safe_load.deepspeed_loads():  # DeepSpeed unpickles with weights_only=False: forced weights-only
            _, client = self.engine.load_checkpoint(str(source.parent), tag=source.name)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {source}")
        rng_file = tag_dir / f"rng_rank{dist.rank()}.pt"
        rank_state: dict = {}
        if universal is not None:
            dist.log0("[mimscale] another world size or ZeRO stage: per-rank state starts fresh (RNG streams, WebDataset "
                      "cursors, the EMA's fp32 shadow, restarted from the EMA weights)")
        elif rng_file.is_file():
            # weights-only; numpy's array globals allowed for rank files written before rng_state held tensors
            state = safe_load.load(rng_file, map_location=None, extra=safe_load.numpy_array_globals())
            set_rng_state(state)
            rank_state = state.get("rank_state", {})
        else:
            dist.log0(f"[mimscale] {rng_file.name} missing (world size changed?): RNG streams are reseeded, not restored")
        parts = client.get(CLIENT_KEY)
        if parts is None:
            parts, rank_state = _legacy_parts(client, rank_state)
        missing = [name for name in self.parts if name not in parts]
        if missing:
            raise RuntimeError(f"checkpoint {tag_dir} holds no state for {', '.join(missing)} "
                               f"(it has {', '.join(sorted(parts)) or 'none'})")
        for name, part in self.parts.items():
            part.load_state_dict(parts[name])
            part.load_rank_state_dict(rank_state.get(name) or {})


def _fsync_written(tag_dir: Path, rank: int) -> None:
    """fsync the files of ``tag_dir`` this rank wrote (on NFS/Lustre only the writer's fsync
    flushes its client cache)."""
    for f in tag_dir.rglob("*"):
        m = WRITER_RE.search(f.name)
        if f.is_file() and (int(m.group(1)) if m else 0) == rank:
            fsync_path(f)


def _reraise_explained(error: BaseException, path: Path) -> None:
    """Raise ``error``, as ``CheckpointDiskFull`` when the disk under ``path`` is full."""
    explained = explain_write_error(error, path)
    if explained is error:
        raise error
    raise explained


def _fsync_file(path: Path) -> None:
    """A background-written file of this rank to stable storage (background.Writer's last step)."""
    fsync_path(path)


def _publish_marker(tag_dir: Path, marker: dict) -> None:
    """Write, fsync, rename into place, fsync the directory: the marker is whole or absent."""
    marker = formats.stamp("checkpoint", marker)  # format_version: a reader refuses a newer one (formats.py)
    tmp = tag_dir / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(marker))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / MARKER)
    fsync_path(tag_dir)
    fsync_path(tag_dir.parent)


def _prune(root: Path, keep: int) -> None:
    tags = complete_tags(root)
    for _, d in tags[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    newest = tags[-1][0] if tags else -1
    for d in root.iterdir():  # leftovers of saves that never completed
        m = TAG_RE.match(d.name)
        if m and int(m.group(1)) < newest and not (d / MARKER).exists():
            shutil.rmtree(d, ignore_errors=True)

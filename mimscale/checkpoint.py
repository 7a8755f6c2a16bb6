"""Checkpoints: the engine's own save/load plus per-rank RNG state and a completion marker.

Layout: ``<output_dir>/checkpoints/step00001234/`` holds DeepSpeed's files, one
``rng_rank<r>.pt`` per rank, and ``COMPLETE`` written by rank 0 only after every rank finished
writing. Only tags with ``COMPLETE`` are ever picked for resume, so a checkpoint cut off
half-way (preemption during save, full disk) is never mistaken for the latest.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mimscale import dist

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step(\d{8,})$")


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


def resolve_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """The checkpoint directory (one tag) to resume from, or None for a fresh start.

    ``auto``: the newest complete checkpoint in output_dir, if any; ``never``: None; a path: that
    tag directory, or the newest complete tag inside a ``checkpoints`` directory."""
    if resume == "never":
        return None
    if resume == "auto":
        tags = complete_tags(checkpoint_root(output_dir))
        return tags[-1][1] if tags else None
    p = Path(resume)
    if (p / MARKER).is_file():
        return p
    tags = complete_tags(p) or complete_tags(p / "checkpoints")
    if tags:
        return tags[-1][1]
    raise FileNotFoundError(f"resume={resume!r} holds no complete checkpoint (a directory with a {MARKER} file)")


def check_resume(resume: str, output_dir: str | Path, world_size: int) -> Optional[Path]:
    """Resolve ``resume`` before anything is built, as a ConfigError when it cannot work:
    a path without a complete checkpoint, a world size the ZeRO checkpoint was not written for,
    or ``never`` over an output_dir that holds another run's checkpoints (it would mix the two)."""
    from mimscale.config import ConfigError

    if resume == "never":
        tags = complete_tags(checkpoint_root(output_dir))
        if tags:
            raise ConfigError(
                f"config key 'resume' = 'never' but output_dir {output_dir} holds checkpoints of an earlier run "
                f"(latest {tags[-1][1].name}): use resume=auto to continue it, or choose a new output_dir")
        return None
    try:
        tag_dir = resolve_resume(resume, output_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'resume': {e}") from None
    if tag_dir is not None:
        saved = json.loads((tag_dir / MARKER).read_text() or "{}").get("world_size", world_size)
        if saved != world_size:
            raise ConfigError(
                f"checkpoint {tag_dir} was written by {saved} ranks and this run has {world_size}: ZeRO checkpoints "
                f"resume on the same data-parallel size (convert it with DeepSpeed's universal checkpointing first)")
    return tag_dir


def abandon_newer(output_dir: str | Path, step: int) -> None:
    """Resuming from an older checkpoint (a roll-back): newer complete tags are renamed, not
    deleted, so they are never picked as latest and never overwritten half-way."""
    for s, d in complete_tags(checkpoint_root(output_dir)):
        if s > step:
            d.rename(d.with_name(f"{d.name}.abandoned-{int(time.time())}"))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CONFIG = "config.yaml"  # the run's resolved config, beside the weights (export and eval read the model from it)


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep: int, rank_state: Optional[dict] = None,
         marker_extra: Optional[dict] = None, config: Optional[dict] = None) -> Path:
    """Save on every rank (DeepSpeed requires it); returns the tag directory. ``rank_state``: this
    rank's own extra state (e.g. its data streams' positions), kept next to its RNG state.
    ``marker_extra``: small facts readable without loading the checkpoint (e.g. which AMT store
    generation it trained with), written into the COMPLETE marker. ``config``: the run's resolved
    config (``to_dict``), written as ``config.yaml`` in the tag so the weights carry their model."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    if dist.is_rank0() and (root / tag).exists():
        shutil.rmtree(root / tag)  # never write into a folder that may already say COMPLETE
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save({**rng_state(), "rank_state": rank_state or {}}, root / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()  # every rank's files are on disk before the marker says so
    if dist.is_rank0():
        if config is not None:
            import yaml

            (root / tag / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (root / tag / MARKER).write_text(json.dumps({"step": step, "time": time.time(), "world_size": dist.world_size(), **(marker_extra or {})}))
        _prune(root, keep)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    tags = complete_tags(root)
    for _, d in tags[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    newest = tags[-1][0] if tags else -1
    for d in root.iterdir():  # leftovers of saves that never completed
        m = TAG_RE.match(d.name)
        if m and int(m.group(1)) < newest and not (d / MARKER).exists():
            shutil.rmtree(d, ignore_errors=True)


def load(engine, tag_dir: Path) -> tuple[dict, dict]:
    """Load weights, optimizer, scheduler and client state; restore this rank's RNG streams.
    Returns (client state, this rank's rank_state)."""
    _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    rng_file = tag_dir / f"rng_rank{dist.rank()}.pt"
    rank_state: dict = {}
    if rng_file.is_file():
        state = torch.load(rng_file, weights_only=False)
        set_rng_state(state)
        rank_state = state.get("rank_state", {})
    else:
        dist.log0(f"[mimscale] {rng_file.name} missing (world size changed?): RNG streams are reseeded, not restored")
    return client, rank_state

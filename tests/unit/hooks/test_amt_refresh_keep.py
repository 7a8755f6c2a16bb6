"""hooks/amt_refresh.py's pruning of AMT store generations with background saves: the generation a
save still writing names (no COMPLETE marker yet) survives a refresh that happens meanwhile."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from mimscale.checkpoint.checkpointer import MARKER
from mimscale.config import load_config
from mimscale.hooks.amt_refresh import AMTRefresh
from mimscale.masking.amt_store import store_dir


def _hook(out: Path) -> AMTRefresh:
    cfg = load_config(None, ["masking.method=amt"])
    ctx = SimpleNamespace(cfg=cfg, source=range(10), num_patches=4, total_steps=100, steps_per_epoch=10, out=out)
    return AMTRefresh(ctx)


def _generations(out: Path) -> list[int]:
    return sorted({int(p.name[5:9]) for p in store_dir(out).iterdir()})


def _write_generation(out: Path, g: int) -> None:
    store_dir(out).mkdir(parents=True, exist_ok=True)
    (store_dir(out) / f"maps-{g:04d}.f16").write_bytes(b"\0" * 8)


def _complete_tag(out: Path, step: int, generation: int) -> None:
    tag = out / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / MARKER).write_text(json.dumps({"step": step, "amt_generation": generation, "files": {}}))


def test_a_pending_saves_generation_survives_a_refresh_until_its_marker_is_out(tmp_path):
    hook = _hook(tmp_path)
    for g in (1, 2):
        _write_generation(tmp_path, g)
    hook.generation = 1
    _complete_tag(tmp_path, 10, 1)
    hook.generation = 2
    hook.marker_extra()  # a background save at step 20 names generation 2: still writing
    _write_generation(tmp_path, 3)
    hook.generation = 3  # a refresh before the save's marker is out
    hook.after_save()
    assert _generations(tmp_path) == [1, 2, 3]  # 2 kept for the pending save, 1 for step 10's
    _complete_tag(tmp_path, 20, 2)  # the marker is out (the trainer then calls after_save)
    hook.after_save()
    assert hook.unpublished == set() and _generations(tmp_path) == [1, 2, 3]
    (tmp_path / "checkpoints" / "step00000010" / MARKER).unlink()  # pruned by keep_checkpoints
    hook.after_save()
    assert _generations(tmp_path) == [2, 3]

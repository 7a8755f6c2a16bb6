"""Background checkpoint writes (mimscale/checkpoint/background.py) and the disk-full message
(disk.py): a staged save is isolated from later training, the marker comes only after the writes,
a held writer keeps the tag pending, and a really full file system is named as such."""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
import torch

from mimscale.checkpoint import checkpointer as ckpt
from mimscale.checkpoint.background import Writer, stage
from mimscale.checkpoint.checkpointer import MARKER, Checkpointer, Stateful, TrainState, verify
from mimscale.checkpoint.disk import CheckpointDiskFull, explain_write_error


class StagingAwareEngine:
    """DeepSpeed's save path as it matters here: ``save_checkpoint`` hands its live tensors to
    ``self.checkpoint_engine.save`` (which the Checkpointer swaps for a background save)."""

    class _TorchEngine:
        def save(self, state_dict, path):
            torch.save(state_dict, path)

    def __init__(self):
        self.weight = torch.arange(6, dtype=torch.float32)
        self.checkpoint_engine = self._TorchEngine()

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        # a view of the live tensor, as DeepSpeed's flat partitions are
        self.checkpoint_engine.save({"w": self.weight, "w_view": self.weight[2:4], **client_state}, str(d / "model.pt"))

    def load_checkpoint(self, root, tag):
        sd = torch.load(Path(root) / tag / "model.pt")
        self.weight.copy_(sd["w"])
        return None, sd

    def zero_optimization_stage(self):
        return 1


def test_stage_copies_every_tensor_so_later_in_place_updates_do_not_reach_it():
    live = torch.ones(4)
    staged = stage({"a": live, "b": [live[1:3], (live,)], "n": 3, "s": "x"})
    live.add_(1)  # the next optimizer step
    assert torch.equal(staged["a"], torch.ones(4)) and torch.equal(staged["b"][0], torch.ones(2))
    assert staged["b"][1][0] is staged["a"]  # one copy per live tensor
    assert staged["n"] == 3 and staged["s"] == "x"


def test_stage_keeps_container_types_deepspeed_reads_back():
    """ZeRO-3's consolidation calls .numel() on the saved torch.Size shapes; OrderedDicts keep order."""
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "a b")
    live = torch.zeros(2)
    staged = stage({"shapes": OrderedDict(w=torch.Size([2, 3])), "pair": Pair(live, 1)})
    assert type(staged["shapes"]) is OrderedDict and type(staged["shapes"]["w"]) is torch.Size
    assert staged["shapes"]["w"].numel() == 6
    assert type(staged["pair"]) is Pair and staged["pair"].a is not live and torch.equal(staged["pair"].a, live)


def test_a_background_save_is_the_state_at_save_time_and_its_marker_comes_after_the_writes(tmp_path):
    engine = StagingAwareEngine()
    c = Checkpointer(engine, tmp_path, keep=2, background=True)
    state = TrainState(step=7, samples_seen=70)
    c.register("train", state)
    release = threading.Event()
    held = []
    original = ckpt._fsync_file

    def held_fsync(path):
        held.append(Path(path).name)
        release.wait(30)
        original(path)

    ckpt._fsync_file = held_fsync
    try:
        tag = c.save(7)
        engine.weight.mul_(10)  # training goes on while the writer is held
        state.step = 8
        assert c.pending_step() == 7 and c.writing()
        assert not (tag / MARKER).exists()  # files not durable yet: no marker
        release.set()
        assert c.finish_pending() == tag
    finally:
        ckpt._fsync_file = original
        release.set()
        c.close()
    assert held and verify(tag) is None and c.pending_step() is None
    engine2, state2 = StagingAwareEngine(), TrainState()
    engine2.weight.zero_()
    c2 = Checkpointer(engine2, tmp_path, keep=2)
    c2.register("train", state2)
    c2.restore(tag)
    assert torch.equal(engine2.weight, torch.arange(6, dtype=torch.float32))  # not the x10 of later steps
    assert state2.step == 7 and state2.samples_seen == 70


def test_publish_pending_runs_only_when_every_writer_is_idle(tmp_path):
    """The training loop's path: poll ``writing()`` until idle, then ``publish_pending``."""
    engine = StagingAwareEngine()
    c = Checkpointer(engine, tmp_path, keep=1, background=True)
    c.register("train", TrainState(step=3))
    first = c.save(3)
    while c.writing():
        pass
    assert c.publish_pending() == first and verify(first) is None
    second = c.save(5)  # keep=1: publishing the second prunes the first
    c.finish_pending()
    c.close()
    assert verify(second) is None and not first.exists()


class Broken(Stateful):
    def state_dict(self):
        return {"big": torch.zeros(1 << 20)}  # 4 MiB: more than the small file system holds

    def load_state_dict(self, state):
        pass


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs (needs the rights to mount one: root in CI's container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the full-disk case needs one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("background", [True, False])
def test_a_full_disk_is_named_with_the_path_and_the_free_space(small_fs, background):
    engine = StagingAwareEngine()
    c = Checkpointer(engine, small_fs / "run", keep=2, background=background)
    c.register("big", Broken())
    with pytest.raises(CheckpointDiskFull) as e:
        c.save(1)
        c.finish_pending()
    c.close()
    msg = str(e.value)
    assert "disk is full" in msg and str(small_fs / "run" / "checkpoints" / "step00000001") in msg and "free there" in msg
    assert not (small_fs / "run" / "checkpoints" / "step00000001" / MARKER).exists()


def test_writer_errors_other_than_space_pass_unchanged(tmp_path):
    w = Writer(lambda p: None)
    w.put({"x": torch.zeros(2)}, tmp_path / "missing-dir" / "f.pt")  # no such directory: not a full disk
    with pytest.raises(RuntimeError) as e:
        w.wait()
    w.close()
    assert not isinstance(e.value, CheckpointDiskFull)
    assert type(explain_write_error(ValueError("x"), tmp_path)) is ValueError
